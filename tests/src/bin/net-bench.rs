//! Pod network throughput and latency, vmbox against runc, side by side: two pods of each
//! runtime on one bridge in a test network namespace (MTU 1400, as the CNI tests use),
//! plus the bridge's namespace as "node". Not a test: prints a table.
//!
//!   make bench-net        (VMBOX_BENCH_MIB=256 by default)
//!
//! Throughput: busybox `wget` of a file of VMBOX_BENCH_MIB MiB from busybox `httpd` (one
//! TCP stream, the guest's and host's default congestion control). Latency: the average
//! of 20 busybox pings, 0.2 s apart.

use std::time::Duration;

use vmbox_tests::containerd::{containerd, ok, text, Containerd, IMAGE, RUNTIME};
use vmbox_tests::netns::Netns;

fn exec(c: &Containerd, id: &str, exec_id: &str, script: &str) -> String {
    let out = c.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// busybox `time`'s "real 0m 1.23s" in seconds.
fn real_seconds(out: &str) -> Option<f64> {
    let l = out.lines().find(|l| l.trim_start().starts_with("real"))?;
    let rest = l.trim_start().trim_start_matches("real").trim();
    let (m, s) = rest.split_once('m')?;
    Some(m.trim().parse::<f64>().ok()? * 60.0 + s.trim().trim_end_matches('s').parse::<f64>().ok()?)
}

/// busybox ping's "round-trip min/avg/max = 0.1/0.2/0.3 ms": the average.
fn avg_ms(out: &str) -> Option<f64> {
    let l = out.lines().find(|l| l.contains("min/avg/max"))?;
    l.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
}

fn main() {
    let mib: u32 = std::env::var("VMBOX_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let c = containerd();
    let ns = Netns::new(&["bench-node", "bench-v1", "bench-v2", "bench-r1", "bench-r2"]);
    ns.bridge("10.97.0.1/24", "fd00:97::1/64", 1400);
    let pods = [
        ("vmbox", RUNTIME, 1, 2, "nb-v1", "nb-v2"),
        ("runc", "io.containerd.runc.v2", 3, 4, "nb-r1", "nb-r2"),
    ];
    println!("pod network, {mib} MiB over one TCP stream and 20 pings (MTU 1400, one bridge)");
    println!(
        "{:<8} {:>16} {:>16} {:>14} {:>14}",
        "runtime", "pod->pod MB/s", "node->pod MB/s", "pod->pod ms", "node->pod ms"
    );
    for (name, runtime, i, j, server, client) in pods {
        for k in [i, j] {
            ns.wire(
                k,
                &format!("10.97.0.{}/24", k + 1),
                &format!("fd00:97::{}/64", k + 1),
                "10.97.0.1",
                "fd00:97::1",
                1400,
            );
        }
        let with_ns = |k: usize| format!("network:{}", ns.path(k).display());
        let serve = format!(
            "mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/blob bs=1M count={mib} 2>/dev/null && exec httpd -f -p 8080 -h /tmp/www"
        );
        for (k, id, cmd) in [(i, server, serve.as_str()), (j, client, "sleep 100000")] {
            ok(
                &c.ctr(&[
                    "run",
                    "-d",
                    "--runtime",
                    runtime,
                    "--with-ns",
                    &with_ns(k),
                    IMAGE,
                    id,
                    "sh",
                    "-c",
                    cmd,
                ]),
                id,
            );
        }
        let ip = format!("10.97.0.{}", i + 1);
        // Wait (bounded) for the server's file and listener.
        let t = std::time::Instant::now();
        while !exec(
            c,
            client,
            "probe",
            &format!("wget -q -O /dev/null --spider http://{ip}:8080/blob && echo up"),
        )
        .contains("up")
        {
            assert!(t.elapsed() < Duration::from_secs(60), "{name}: httpd never came up");
        }
        let url = format!("http://{ip}:8080/blob");
        let pod = real_seconds(&exec(c, client, "get", &format!("time wget -q -O /dev/null {url}")));
        let node_out = ns.exec(
            0,
            &["busybox", "time", "busybox", "wget", "-q", "-O", "/dev/null", &url],
        );
        let node = real_seconds(&format!("{}{}", text(&node_out.stdout), text(&node_out.stderr)));
        let pod_lat = avg_ms(&exec(c, client, "ping", &format!("ping -c 20 -i 0.2 {ip}")));
        let node_lat = ns.exec(0, &["busybox", "ping", "-c", "20", "-i", "0.2", &ip]);
        let node_lat = avg_ms(&text(&node_lat.stdout));
        let mbps = |s: Option<f64>| {
            s.map(|s| format!("{:.1}", mib as f64 * 1.048576 / s))
                .unwrap_or("?".into())
        };
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or("?".into());
        println!(
            "{:<8} {:>16} {:>16} {:>14} {:>14}",
            name,
            mbps(pod),
            mbps(node),
            ms(pod_lat),
            ms(node_lat)
        );
        for id in [server, client] {
            let _ = c.ctr(&["task", "kill", "-s", "KILL", id]);
            let _ = c.ctr(&["task", "delete", "-f", id]);
            let _ = c.ctr(&["container", "rm", id]);
        }
    }
}
