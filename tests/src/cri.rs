//! The project's own CRI client for the Kubernetes-shaped tests (Debian 12 has no
//! crictl): CRI v1 over containerd's gRPC socket, every call bounded by a deadline.
//!
//! The containerd behind it ([`cri_containerd`]) is a private one with the CRI plugin
//! enabled, runtime handler "vmbox" by default and "runc" beside it, a locally built
//! pause and busybox image in namespace `k8s.io`, and a CNI bridge in a network
//! namespace of its own (tests/containerd/containerd.sh, `VMBOX_CTR_CRI=1`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, IMAGE};

/// The sandbox (pause) image the CRI containerd is configured with: busybox sleeping.
pub const PAUSE_IMAGE: &str = "docker.io/vmbox/pause:latest";
/// Guest memory of the "vmbox-small" runtime handler's config (the default is 256).
pub const SMALL_MEMORY_MIB: u32 = 192;
/// containerd's namespace for CRI.
pub const K8S_NS: &str = "k8s.io";
/// Deadline of one CRI call (a pod's VM boots under TCG within it).
const CALL: Duration = Duration::from_secs(120);

/// The private CRI containerd of this test run (started once, images imported).
pub fn cri_containerd() -> &'static Containerd {
    static C: OnceLock<Containerd> = OnceLock::new();
    C.get_or_init(|| {
        let dir = std::env::var_os("VMBOX_CRI_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/vmbox-cri"));
        let c = Containerd::start_at(&dir, true);
        // The config of the "vmbox-small" handler (its ConfigPath), read at each sandbox's
        // first Create.
        let small = std::fs::read_to_string(&c.config_path)
            .expect("read the test vmbox config")
            .replace("[vm]\n", &format!("[vm]\nmemory_mib = {SMALL_MEMORY_MIB}\n"));
        std::fs::write(c.dir.join("vmbox-small.toml"), small).expect("write vmbox-small.toml");
        for (name, cmd) in [(IMAGE, None), (PAUSE_IMAGE, Some(r#"["sleep","2147483647"]"#))] {
            let tar = c
                .dir
                .join(format!("{}.tar", name.rsplit('/').next().unwrap_or("image")));
            let mut build = Command::new(crate::containerd::repo().join("tests/containerd/build-image.sh"));
            build.arg(&tar).arg(name);
            if let Some(cmd) = cmd {
                build.env("VMBOX_IMAGE_CMD", cmd);
            }
            let out = build.output().expect("run build-image.sh");
            assert!(
                out.status.success(),
                "image build: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = c.ctr(&["-n", K8S_NS, "image", "import", &tar.display().to_string()]);
            assert!(
                out.status.success(),
                "image import: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c
    })
}

/// A CRI client of [`cri_containerd`].
pub struct Cri {
    pub rt: RuntimeServiceClient<Channel>,
    pub containerd: &'static Containerd,
    /// Pods this client made and has not removed: a test that fails half-way does not
    /// leave their VMs running for the next tests (see `Drop`).
    pods: Vec<String>,
}

impl Drop for Cri {
    /// Stops and removes the pods left behind (a failed test), on a runtime of its own.
    fn drop(&mut self) {
        let pods = std::mem::take(&mut self.pods);
        if pods.is_empty() {
            return;
        }
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                let Ok(mut c) = Cri::connect().await else { return };
                for p in pods {
                    if let Err(e) = c.stop_and_remove_pod(&p).await {
                        eprintln!("cleanup of pod {p}: {e}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A pod as the tests make it: its id and the config it was made with (CreateContainer
/// needs it again).
#[derive(Clone)]
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

/// What a test wants of a pod beyond the defaults.
#[derive(Default, Clone)]
pub struct PodSpec {
    pub hostname: String,
    /// CRI's PID namespace mode: POD shares one among the pod's containers.
    pub pid_mode: Option<cri::NamespaceMode>,
    pub annotations: HashMap<String, String>,
    /// Runtime handler; empty is containerd's default (vmbox).
    pub handler: String,
    /// The pod's cgroup parent (cgroupfs form), as the kubelet sets it; empty for none.
    pub cgroup_parent: String,
    /// Pod-level resources (containerd turns them into the sandbox-* annotations).
    pub resources: Option<cri::LinuxContainerResources>,
    /// The pod's DNS (CRI writes the pod's resolv.conf from it).
    pub dns: Option<cri::DnsConfig>,
}

/// Turns a gRPC error into one that names the call.
fn call<T>(what: &str, r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(|r| r.into_inner())
        .map_err(|s| anyhow!("CRI {what}: {:?}: {}", s.code(), s.message()))
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(CALL);
    r
}

impl Cri {
    pub async fn connect() -> Result<Cri> {
        let containerd = cri_containerd();
        let sock = PathBuf::from(&containerd.address);
        let channel = Endpoint::try_from("http://[::]:0")?
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?)) }
            }))
            .await
            .context("connect to containerd's CRI socket")?;
        Ok(Cri {
            rt: RuntimeServiceClient::new(channel),
            containerd,
            pods: Vec::new(),
        })
    }

    /// A new connection (after containerd restarted), keeping the pods this client made.
    pub async fn reconnect(&mut self) -> Result<()> {
        let fresh = Cri::connect().await?;
        self.rt = fresh.rt.clone();
        Ok(())
    }

    /// RunPodSandbox with a unique name from `name`.
    pub async fn run_pod(&mut self, name: &str, spec: PodSpec) -> Result<Pod> {
        let log_directory = self.containerd.dir.join("pods").join(name);
        std::fs::create_dir_all(&log_directory)?;
        let ns_options = cri::NamespaceOption {
            pid: spec.pid_mode.unwrap_or(cri::NamespaceMode::Container) as i32,
            ..Default::default()
        };
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "vmbox-test".into(),
                attempt: 0,
            }),
            hostname: spec.hostname.clone(),
            dns_config: spec.dns.clone(),
            log_directory: log_directory.display().to_string(),
            annotations: spec.annotations.clone(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: spec.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns_options),
                    ..Default::default()
                }),
                resources: spec.resources,
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .rt
            .run_pod_sandbox(req(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: spec.handler.clone(),
            }))
            .await;
        let id = call("RunPodSandbox", r)?.pod_sandbox_id;
        self.pods.push(id.clone());
        Ok(Pod { id, config })
    }

    /// CreateContainer + StartContainer of busybox running `cmd` in `pod`; its id.
    pub async fn run_container(&mut self, pod: &Pod, name: &str, cmd: &[&str]) -> Result<String> {
        let id = self.create_container(pod, name, cmd, |_| {}).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// CreateContainer of busybox running `cmd` in `pod`, `tweak`ed; its id.
    pub async fn create_container(
        &mut self,
        pod: &Pod,
        name: &str,
        cmd: &[&str],
        tweak: impl FnOnce(&mut cri::ContainerConfig),
    ) -> Result<String> {
        let mut config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            // As the kubelet does: the container's namespace options are the pod's
            // (CRI's default enum value is POD, which would share the PID namespace).
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: pod
                        .config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        tweak(&mut config);
        let r = self
            .rt
            .create_container(req(cri::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }))
            .await;
        Ok(call("CreateContainer", r)?.container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<()> {
        let r = self
            .rt
            .start_container(req(cri::StartContainerRequest {
                container_id: id.into(),
            }))
            .await;
        call("StartContainer", r).map(|_| ())
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub async fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let r = self
            .rt
            .exec_sync(req(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            }))
            .await;
        let r = call("ExecSync", r)?;
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// ExecSync that must succeed; its stdout, trimmed.
    pub async fn sh(&mut self, id: &str, script: &str) -> Result<String> {
        let (code, out, err) = self.exec_sync(id, &["sh", "-c", script]).await?;
        if code != 0 {
            return Err(anyhow!("`{script}` in {id}: exit {code}: {err}{out}"));
        }
        Ok(out.trim().to_string())
    }

    pub async fn pod_status(&mut self, pod: &str) -> Result<cri::PodSandboxStatusResponse> {
        let r = self
            .rt
            .pod_sandbox_status(req(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            }))
            .await;
        call("PodSandboxStatus", r)
    }

    /// The sandbox task's pid as containerd records it (PodSandboxStatus verbose info).
    pub async fn sandbox_pid(&mut self, pod: &str) -> Result<i32> {
        let st = self.pod_status(pod).await?;
        let info = st.info.get("info").ok_or_else(|| anyhow!("no verbose info"))?;
        let v: serde_json::Value = serde_json::from_str(info)?;
        v["pid"]
            .as_i64()
            .map(|p| p as i32)
            .ok_or_else(|| anyhow!("no pid in the sandbox info: {info}"))
    }

    /// Whether the pod is SANDBOX_READY.
    pub async fn pod_ready(&mut self, pod: &str) -> Result<bool> {
        let st = self.pod_status(pod).await?;
        Ok(st.status.map(|s| s.state) == Some(cri::PodSandboxState::SandboxReady as i32))
    }

    pub async fn container_state(&mut self, id: &str) -> Result<cri::ContainerState> {
        let r = self
            .rt
            .container_status(req(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .await;
        let st = call("ContainerStatus", r)?
            .status
            .ok_or_else(|| anyhow!("ContainerStatus: no status"))?;
        cri::ContainerState::try_from(st.state).map_err(|e| anyhow!("container state: {e}"))
    }

    pub async fn stop_pod(&mut self, pod: &str) -> Result<()> {
        let r = self
            .rt
            .stop_pod_sandbox(req(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .await;
        call("StopPodSandbox", r).map(|_| ())
    }

    pub async fn remove_pod(&mut self, pod: &str) -> Result<()> {
        let r = self
            .rt
            .remove_pod_sandbox(req(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .await;
        call("RemovePodSandbox", r)?;
        self.pods.retain(|p| p != pod);
        Ok(())
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub async fn stop_and_remove_pod(&mut self, pod: &str) -> Result<()> {
        self.stop_pod(pod).await?;
        self.remove_pod(pod).await
    }

    pub async fn stop_container(&mut self, id: &str, timeout_s: i64) -> Result<()> {
        let r = self
            .rt
            .stop_container(req(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            }))
            .await;
        call("StopContainer", r).map(|_| ())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<()> {
        let r = self
            .rt
            .remove_container(req(cri::RemoveContainerRequest {
                container_id: id.into(),
            }))
            .await;
        call("RemoveContainer", r).map(|_| ())
    }

    pub async fn update_resources(&mut self, id: &str, r: cri::LinuxContainerResources) -> Result<()> {
        let res = self
            .rt
            .update_container_resources(req(cri::UpdateContainerResourcesRequest {
                container_id: id.into(),
                linux: Some(r),
                ..Default::default()
            }))
            .await;
        call("UpdateContainerResources", res).map(|_| ())
    }

    pub async fn container_stats(&mut self, id: &str) -> Result<cri::ContainerStats> {
        let r = self
            .rt
            .container_stats(req(cri::ContainerStatsRequest {
                container_id: id.into(),
            }))
            .await;
        call("ContainerStats", r)?
            .stats
            .ok_or_else(|| anyhow!("ContainerStats: no stats"))
    }

    pub async fn list_container_stats(&mut self, pod: &str) -> Result<Vec<cri::ContainerStats>> {
        let r = self
            .rt
            .list_container_stats(req(cri::ListContainerStatsRequest {
                filter: Some(cri::ContainerStatsFilter {
                    pod_sandbox_id: pod.into(),
                    ..Default::default()
                }),
            }))
            .await;
        Ok(call("ListContainerStats", r)?.stats)
    }

    pub async fn pod_stats(&mut self, pod: &str) -> Result<cri::PodSandboxStats> {
        let r = self
            .rt
            .pod_sandbox_stats(req(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.into(),
            }))
            .await;
        call("PodSandboxStats", r)?
            .stats
            .ok_or_else(|| anyhow!("PodSandboxStats: no stats"))
    }
}

/// The websocket channels of Kubernetes' streaming protocol (`v4.channel.k8s.io`): the
/// first byte of every binary message names the stream.
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    /// v4: the command's final status, as a JSON `metav1.Status`.
    pub const ERROR: u8 = 3;
    /// `{"Width": cols, "Height": rows}`.
    pub const RESIZE: u8 = 4;
}

/// A CRI Exec or Attach session: the streaming server's URL (ExecResponse/AttachResponse)
/// opened as a websocket, as the kubelet's websocket path (and `kubectl exec -it` through
/// it) does.
pub struct Stream {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    /// Everything received on stdout (and stderr, which a tty merges).
    pub output: Vec<u8>,
    /// The v4 status message, once it came (a port-forward's error channel).
    pub status: Option<String>,
    /// A port-forward session: channel 0 carries the data (after the 2-byte port the
    /// server sends first on each channel), channel 1 errors.
    port_forward: bool,
}

/// Connects to `addr` from inside the network namespace at `netns` (containerd's streaming
/// server listens on 127.0.0.1 of its own netns); the socket stays there.
fn connect_in_netns(netns: &str, addr: String) -> Result<std::net::TcpStream> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<std::net::TcpStream> {
        let ns = std::fs::File::open(&netns).with_context(|| format!("open {netns}"))?;
        // This thread only: setns is per thread, and the thread ends here.
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        let s = std::net::TcpStream::connect_timeout(
            &addr.parse().with_context(|| format!("address {addr}"))?,
            Duration::from_secs(5),
        )
        .with_context(|| format!("connect {addr}"))?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow!("netns connect thread panicked"))?
}

impl Stream {
    /// Opens the streaming `url` (http://127.0.0.1:PORT/exec/TOKEN) in containerd's netns.
    pub async fn open(url: &str, netns: &str) -> Result<Stream> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let ws_url = url.replacen("http://", "ws://", 1);
        let hostport = ws_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .ok_or_else(|| anyhow!("streaming url {url}"))?
            .to_string();
        let tcp = connect_in_netns(netns, hostport)?;
        tcp.set_nonblocking(true)?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let mut req = ws_url.as_str().into_client_request()?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse()?);
        let (ws, _) = tokio::time::timeout(CALL, tokio_tungstenite::client_async(req, tcp))
            .await
            .map_err(|_| anyhow!("websocket handshake with {url}: timed out"))??;
        Ok(Stream {
            ws,
            output: Vec::new(),
            status: None,
            port_forward: false,
        })
    }

    /// Sends `data` on channel `ch`.
    pub async fn send(&mut self, ch: u8, data: &[u8]) -> Result<()> {
        use futures_util::SinkExt;
        let mut m = vec![ch];
        m.extend_from_slice(data);
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(m.into()))
            .await?;
        Ok(())
    }

    /// A terminal size change.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        self.send(
            channel::RESIZE,
            format!("{{\"Width\":{cols},\"Height\":{rows}}}").as_bytes(),
        )
        .await
    }

    /// Reads until the output contains `needle` (true), or the stream ends (false);
    /// an error after `within`.
    pub async fn read_until(&mut self, needle: &str, within: Duration) -> Result<bool> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if String::from_utf8_lossy(&self.output).contains(needle) {
                return Ok(true);
            }
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => {
                    return Err(anyhow!(
                        "no {needle:?} within {within:?}; output so far: {:?}",
                        String::from_utf8_lossy(&self.output)
                    ))
                }
                Ok(None) => return Ok(false),
                Ok(Some(m)) => m?,
            };
            if let (tokio_tungstenite::tungstenite::Message::Binary(b), true) = (&msg, self.port_forward) {
                match b.first() {
                    Some(&0) => self.output.extend_from_slice(&b[1..]),
                    Some(&1) if b.len() > 3 => self.status = Some(String::from_utf8_lossy(&b[1..]).into_owned()),
                    _ => {}
                }
            } else if let tokio_tungstenite::tungstenite::Message::Binary(b) = msg {
                match b.first() {
                    Some(&channel::STDOUT) | Some(&channel::STDERR) => self.output.extend_from_slice(&b[1..]),
                    Some(&channel::ERROR) => self.status = Some(String::from_utf8_lossy(&b[1..]).into_owned()),
                    _ => {}
                }
            } else if let tokio_tungstenite::tungstenite::Message::Close(_) = msg {
                return Ok(false);
            }
        }
    }

    /// Reads to the end of the session (bounded by `within`); the output.
    pub async fn finish(&mut self, within: Duration) -> Result<String> {
        // A needle that never appears: read until the server closes.
        self.read_until("\u{0}\u{1}never", within).await?;
        Ok(String::from_utf8_lossy(&self.output).into_owned())
    }
}

impl Cri {
    /// CRI Exec; the session opened.
    pub async fn exec(&mut self, id: &str, cmd: &[&str], tty: bool, stdin: bool) -> Result<Stream> {
        let r = self
            .rt
            .exec(req(cri::ExecRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            }))
            .await;
        let url = call("Exec", r)?.url;
        Stream::open(&url, &self.netns()).await
    }

    /// CRI PortForward to `port` of `pod`, opened the way the kubelet's websocket path
    /// does (`?port=`); send on channel 0, read with [`Stream::read_until`].
    pub async fn port_forward(&mut self, pod: &str, port: u16) -> Result<Stream> {
        let r = self
            .rt
            .port_forward(req(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: vec![port.into()],
            }))
            .await;
        let url = call("PortForward", r)?.url;
        let mut s = Stream::open(&format!("{url}?port={port}"), &self.netns()).await?;
        s.port_forward = true;
        Ok(s)
    }

    /// CRI Attach to a container's init (its stdin and tty as created); the session.
    pub async fn attach(&mut self, id: &str, tty: bool) -> Result<Stream> {
        let r = self
            .rt
            .attach(req(cri::AttachRequest {
                container_id: id.into(),
                stdin: true,
                tty,
                stdout: true,
                stderr: !tty,
            }))
            .await;
        let url = call("Attach", r)?.url;
        Stream::open(&url, &self.netns()).await
    }

    /// The network namespace containerd (and its streaming server) runs in.
    fn netns(&self) -> String {
        format!(
            "/var/run/netns/{}",
            std::env::var("VMBOX_CTR_NETNS").unwrap_or_else(|_| "vmbox-cri-node".into())
        )
    }
}
