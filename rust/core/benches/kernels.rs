//! Criterion benchmarks: RNG throughput and the aggregation kernels.
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

criterion_group!(benches, rng, kernels);
criterion_main!(benches);
