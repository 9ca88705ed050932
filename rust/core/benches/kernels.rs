//! Criterion benchmarks: RNG throughput, the aggregation kernels and max pooling.
//!
//! `cargo bench -p emberfl-core` — results under target/criterion.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use emberfl_core::aggregate;
use emberfl_core::pool::pool;
use emberfl_core::rng::Stream;

fn rng(c: &mut Criterion) {
    let mut g = c.benchmark_group("rng");
    let n = 1 << 20;
    g.throughput(Throughput::Bytes((n * 8) as u64));
    let mut out = vec![0u64; n];
    g.bench_function("philox4x64_raw_1M_words", |b| {
        let mut s = Stream::for_client(1, 2, 3, 4);
        b.iter(|| s.fill_u64(std::hint::black_box(&mut out)))
    });
    g.finish();
}

fn kernels(c: &mut Criterion) {
    let (k, dim) = (16, 1 << 20);
    let mut s = Stream::for_client(0, 0, 0, 0);
    let data: Vec<Vec<f32>> = (0..k)
        .map(|_| (0..dim).map(|_| s.next_f64() as f32).collect())
        .collect();
    let views: Vec<&[f32]> = data.iter().map(|v| v.as_slice()).collect();
    let w: Vec<f64> = (0..k).map(|i| 1.0 + i as f64).collect();
    let mut out = vec![0f32; dim];
    let mut g = c.benchmark_group("aggregate_16x1M");
    g.throughput(Throughput::Bytes((k * dim * 4) as u64));
    g.sample_size(20);
    for threads in [1, 2] {
        let p = pool(threads).unwrap();
        g.bench_with_input(
            BenchmarkId::new("weighted_mean", threads),
            &threads,
            |b, _| b.iter(|| aggregate::weighted_mean(&views, &w, &mut out, &p).unwrap()),
        );
        g.bench_with_input(BenchmarkId::new("norms", threads), &threads, |b, _| {
            b.iter(|| aggregate::norms(&views, &p).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("median", threads), &threads, |b, _| {
            b.iter(|| aggregate::median(&views, &mut out, &p).unwrap())
        });
    }
    g.finish();
}

/// The first pool of the CIFAR-10 tutorial CNN at batch 50: 300 planes of 28x28, 2x2.
fn maxpool(c: &mut Criterion) {
    use emberfl_core::maxpool::{max_pool2d_backward, max_pool2d_forward, Planes, Window};
    let shape = Planes {
        planes: 300,
        h: 28,
        w: 28,
    };
    let win = Window {
        kh: 2,
        kw: 2,
        sh: 2,
        sw: 2,
    };
    let mut s = Stream::for_client(0, 0, 0, 1);
    let x: Vec<f32> = (0..300 * 28 * 28).map(|_| s.next_f64() as f32).collect();
    let mut out = vec![0f32; 300 * 14 * 14];
    let mut arg = vec![0u8; 300 * 14 * 14];
    let mut gi = vec![0f32; x.len()];
    let p = pool(1).unwrap();
    let mut g = c.benchmark_group("max_pool2d_300x28x28");
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    g.bench_function("forward", |b| {
        b.iter(|| max_pool2d_forward(&x, shape, win, &mut out, &mut arg, &p).unwrap())
    });
    g.bench_function("backward", |b| {
        b.iter(|| max_pool2d_backward(&out, &arg, shape, win, &mut gi, &p).unwrap())
    });
    g.finish();
}

criterion_group!(benches, rng, kernels, maxpool);
criterion_main!(benches);
