//! BENCH-ONLY: 4 KiB random writes and reads on one file, for `make bench`'s fs phase
//! (the bench image is busybox, which has no fio).
//!
//! ```text
//! carapace-fsio FILE MIB OPS
//! ```
//!
//! Lays FILE out (MIB MiB written sequentially, then fsync; untimed), then times OPS
//! 4 KiB writes at random 4 KiB-aligned offsets followed by one fsync, then OPS 4 KiB reads
//! at random offsets, and prints `FSIO rand_write_iops N` and `FSIO rand_read_iops N`. The
//! offsets come from a fixed seed, so every runtime and daemon sees the same pattern. Built
//! static (like carapace-vmm-guest-test), so it runs in any image. Exit 2 on bad arguments,
//! 1 on an I/O error (named, with the file).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Instant;

const BLOCK: u64 = 4096;

/// xorshift64*: deterministic offsets, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn run(path: &str, mib: u64, ops: u64) -> std::io::Result<(f64, f64)> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut buf = vec![0xa5u8; 1 << 20];
    for i in 0..mib {
        f.write_all_at(&buf, i << 20)?;
    }
    f.sync_all()?;
    let blocks = (mib << 20) / BLOCK;
    buf.truncate(BLOCK as usize);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = Instant::now();
    for i in 0..ops {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all_at(&buf, (rng.next() % blocks) * BLOCK)?;
    }
    f.sync_all()?;
    let write_iops = ops as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..ops {
        f.read_exact_at(&mut buf, (rng.next() % blocks) * BLOCK)?;
    }
    let read_iops = ops as f64 / t.elapsed().as_secs_f64();
    Ok((write_iops, read_iops))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, path, mib, ops] => mib
            .parse::<u64>()
            .ok()
            .zip(ops.parse::<u64>().ok())
            .filter(|(m, o)| (1..=4096).contains(m) && (1..=10_000_000).contains(o))
            .map(|(m, o)| (path, m, o)),
        _ => None,
    };
    let Some((path, mib, ops)) = parsed else {
        eprintln!("usage: carapace-fsio FILE MIB(1..=4096) OPS(1..=10000000)");
        return ExitCode::from(2);
    };
    match run(path, mib, ops) {
        Ok((w, r)) => {
            println!("FSIO rand_write_iops {w:.1}");
            println!("FSIO rand_read_iops {r:.1}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("carapace-fsio: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
