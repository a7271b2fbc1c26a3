//! The ttrpc `Agent` service: decodes requests, calls into [`Containers`], encodes replies.

use std::time::Duration;

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use vmbox_protocol::agent::*;
use vmbox_protocol::agent_ttrpc::Agent;
use vmbox_protocol::PROTOCOL_VERSION;

use crate::container::Containers;
use crate::{cgroup, shutdown, AgentError};

pub struct Service {
    pub containers: Containers,
    pub kernel_release: String,
}

type Res<T> = ttrpc::Result<T>;

fn reply<T>(what: &str, r: Result<T, AgentError>) -> Res<T> {
    r.map_err(|e| {
        log::warn!("{what}: {e}");
        e.into()
    })
}

#[async_trait]
impl Agent for Service {
    async fn get_version(&self, _: &TtrpcContext, _: GetVersionRequest) -> Res<VersionResponse> {
        Ok(VersionResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: self.kernel_release.clone(),
            ..Default::default()
        })
    }

    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> Res<CheckResponse> {
        Ok(CheckResponse {
            serving: true,
            ..Default::default()
        })
    }

    async fn create_container(&self, _: &TtrpcContext, r: CreateContainerRequest) -> Res<PidResponse> {
        let stdio = r.stdio.clone().unwrap_or_default();
        let created = self
            .containers
            .create(&r.container_id, &r.oci_spec, &r.rootfs, &stdio, r.pod.as_ref())
            .await;
        let pid = reply("create_container", created)?;
        Ok(PidResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Res<PidResponse> {
        let pid = reply("start_container", self.containers.start(&r.container_id).await)?;
        Ok(PidResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn exec_process(&self, _: &TtrpcContext, r: ExecProcessRequest) -> Res<PidResponse> {
        let stdio = r.stdio.clone().unwrap_or_default();
        let pid = reply(
            "exec_process",
            self.containers
                .exec(&r.container_id, &r.exec_id, &r.process, &stdio)
                .await,
        )?;
        Ok(PidResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn signal_process(&self, _: &TtrpcContext, r: SignalProcessRequest) -> Res<Empty> {
        reply(
            "signal_process",
            self.containers
                .signal(&r.container_id, &r.exec_id, r.signal, r.all)
                .await,
        )?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _: &TtrpcContext, r: ProcessRequest) -> Res<WaitProcessResponse> {
        let exit = reply("wait_process", self.containers.wait(&r.container_id, &r.exec_id).await)?;
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            signal: exit.signal,
            exited_at_ns: exit.at_ns,
            ..Default::default()
        })
    }

    async fn resize_pty(&self, _: &TtrpcContext, r: ResizePtyRequest) -> Res<Empty> {
        reply(
            "resize_pty",
            self.containers
                .resize(&r.container_id, &r.exec_id, r.rows, r.cols)
                .await,
        )?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, r: ProcessRequest) -> Res<Empty> {
        // The host ends stdin by closing the stdin stream after its last byte; the agent
        // closes the pipe when that stream reaches its end, so nothing sent is dropped.
        // Here we only check the process exists.
        reply(
            "close_stdin",
            self.containers
                .with(&r.container_id, |c| c.process(&r.exec_id).map(|_| ()))
                .await,
        )?;
        Ok(Empty::new())
    }

    async fn list_processes(&self, _: &TtrpcContext, r: ContainerRequest) -> Res<ListProcessesResponse> {
        reply(
            "list_processes",
            self.containers.with(&r.container_id, |_| Ok(())).await,
        )?;
        let pids = reply("list_processes", cgroup::pids(&r.container_id))?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn stats_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Res<StatsContainerResponse> {
        reply(
            "stats_container",
            self.containers.with(&r.container_id, |_| Ok(())).await,
        )?;
        reply("stats_container", cgroup::stats(&r.container_id))
    }

    async fn pause_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Res<Empty> {
        reply("pause_container", self.containers.pause(&r.container_id, true).await)?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _: &TtrpcContext, r: ContainerRequest) -> Res<Empty> {
        reply("resume_container", self.containers.pause(&r.container_id, false).await)?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _: &TtrpcContext, r: UpdateContainerRequest) -> Res<Empty> {
        reply(
            "update_container",
            self.containers.with(&r.container_id, |_| Ok(())).await,
        )?;
        let res: oci_spec::runtime::LinuxResources = reply(
            "update_container",
            serde_json::from_slice(&r.resources).map_err(|e| AgentError::Invalid(format!("resources: {e}"))),
        )?;
        reply("update_container", cgroup::update(&r.container_id, &res))?;
        Ok(Empty::new())
    }

    async fn list_listeners(&self, _: &TtrpcContext, _: Empty) -> Res<ListenersResponse> {
        Ok(ListenersResponse {
            ports: crate::forward::listeners(),
            ..Default::default()
        })
    }

    async fn setup_network(&self, _: &TtrpcContext, r: Network) -> Res<Network> {
        let applied = async {
            let want = vmbox_network::proto::decode(&r)?;
            // Netlink on a thread of its own (the guest's one namespace; no setns).
            let view = tokio::task::spawn_blocking(move || {
                vmbox_network::netns::run_in(
                    None,
                    move |h| async move { vmbox_network::guest::apply(&h, &want).await },
                )
            })
            .await
            .map_err(|e| AgentError::Internal(format!("network thread: {e}")))??;
            log::info!("network: {}", view.to_string().trim_end().replace('\n', "; "));
            Ok::<_, AgentError>(vmbox_network::proto::encode(&view))
        };
        reply("setup_network", applied.await)
    }

    async fn remove_container(&self, _: &TtrpcContext, r: RemoveContainerRequest) -> Res<Empty> {
        reply(
            "remove_container",
            self.containers.remove(&r.container_id, r.force).await,
        )?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> Res<OomEvent> {
        Ok(OomEvent {
            container_id: self.containers.oom.next().await,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, r: ShutdownRequest) -> Res<ShutdownResponse> {
        let grace = Duration::from_millis(r.grace_period_ms as u64);
        let killed = shutdown::stop_all(&self.containers, grace).await;
        reply("shutdown", shutdown::flush())?;
        shutdown::power_off_soon();
        Ok(ShutdownResponse {
            killed,
            ..Default::default()
        })
    }
}
