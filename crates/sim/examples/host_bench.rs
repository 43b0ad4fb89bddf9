//! Benchmarks the simulated host: notifications per second through an event
//! channel and grant-copy throughput. Run in release:
//! `cargo run --release -p xen-sim --example host_bench`.

use xen_sim::host::bench::{evtchn_ping_pong, grant_copy, CopyDirection};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let round_trips = 200_000;
    let n = evtchn_ping_pong(round_trips)?;
    println!(
        "event channel ping-pong: {} round trips in {:.3} s: {:.0} notifications/s ({:.2} us per round trip)",
        n.round_trips,
        n.elapsed.as_secs_f64(),
        n.notifications_per_sec(),
        n.elapsed.as_secs_f64() * 1e6 / n.round_trips as f64
    );
    let total = 1u64 << 30;
    for batch in [1, 11, 32] {
        for dir in [CopyDirection::FromGuest, CopyDirection::ToGuest] {
            let c = grant_copy(batch, total, dir)?;
            println!(
                "grant copy {dir:?}, 4 KiB segments, batch {batch:2}: {:.0} MB/s ({:.0} segments/s)",
                c.mb_per_sec(),
                c.bytes as f64 / 4096.0 / c.elapsed.as_secs_f64()
            );
        }
    }
    Ok(())
}
