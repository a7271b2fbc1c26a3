//! VM-level benchmark (not a test): boot-to-agent-ready, and create+start+wait+remove of
//! `true` in a running VM; median/min/max of N runs (default 10, `VMBOX_BENCH_RUNS`).
//! Prints a table naming the accelerator: TCG figures are not KVM figures.
//!
//!   make bench-vm

use std::time::{Duration, Instant};

use vmbox_hypervisor::Vm;
use vmbox_tests::TestVm;

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("VMBOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut boots = Vec::new();
    let mut guest_boot = Vec::new();
    let mut host_start = Vec::new();
    let mut accel = "";
    for i in 0..runs {
        let t = Instant::now();
        let vm = TestVm::boot(&format!("bench-boot-{i}")).await?;
        boots.push(t.elapsed());
        guest_boot.push(Duration::from_micros(vm.vm.hello().boot_time_us));
        let b = vm.vm.boot_times();
        host_start.push(b.daemons + b.vmm_init);
        accel = vm.vm.accel().name();
        vm.shutdown().await?;
    }
    let vm = TestVm::boot("bench-run").await?;
    let confined = vm.vm.confined_uid().is_some();
    // Host processes of the idle VM, without the guest's RAM (QEMU's memfd mapping).
    let mut pss_kib = 0u64;
    for pid in vm.vm.pids() {
        pss_kib += pss_without_guest_ram(pid);
    }
    let mut runs_true = Vec::new();
    for i in 0..runs {
        let id = format!("true-{i}");
        let t = Instant::now();
        let (status, _, _) = vm.run(&id, &["true"]).await?;
        runs_true.push(t.elapsed());
        anyhow::ensure!(status == 0, "true exited {status}");
    }
    vm.shutdown().await?;
    println!(
        "vmbox VM-level benchmark, accelerator: {accel}, confinement {} (VMBOX_TEST_CONFINEMENT), {runs} runs each",
        if confined { "on" } else { "off" }
    );
    println!(
        "idle VM's host processes (QEMU, daemons), PSS without guest RAM: {:.1} MiB",
        pss_kib as f64 / 1024.0
    );
    println!("| measurement | median ms | min ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("VM start to agent ready (host: daemons, QEMU, boot, hello)", boots),
        ("kernel start to agent ready (guest CLOCK_BOOTTIME)", guest_boot),
        (
            "host side of the start: daemons up + QEMU init to vCPUs released",
            host_start,
        ),
        ("create+start+wait+remove `true`", runs_true),
    ] {
        let (med, min, max) = stats(v);
        println!("| {name} | {med:.1} | {min:.1} | {max:.1} |");
    }
    Ok(())
}

/// PSS of `pid` in KiB from /proc/<pid>/smaps, leaving out the guest's RAM (the
/// `memory-backend-memfd` mapping, named `/memfd:mem`).
fn pss_without_guest_ram(pid: u32) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut total = 0;
    let mut guest = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Pss:") {
            if !guest {
                total += kib.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0);
            }
        } else if line.contains('-') && line.split_whitespace().count() >= 5 && !line.ends_with(':') {
            guest = line.contains("/memfd:mem");
        }
    }
    total
}
