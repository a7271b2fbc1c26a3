//! containerd's Task API (v2) as a thin adapter: each request is decoded (ids checked once,
//! here, into [`Id`]s), handed to the [`Core`], and its answer encoded.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status as ApiStatus, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use vmbox_protocol::Id;

use crate::agent::ProcessRef;
use crate::core::process::Status;
use crate::core::{Core, CreateRequest};
use crate::error::ShimError;
use crate::io::StdioPaths;
use crate::metrics;

pub struct TaskService {
    core: Arc<Core>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(core: Arc<Core>, exit: Arc<ExitSignal>) -> TaskService {
        TaskService { core, exit }
    }
}

/// Runs a request on the core in a task of its own. ttrpc drops a request's future when
/// containerd's deadline passes; a transition cut half-way would leave a process in an
/// in-between state (Creating, Starting, Deleting) for ever. In its own task it finishes,
/// and the next request finds a settled state.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, ShimError>> + Send + 'static,
) -> Result<T, ShimError> {
    tokio::spawn(f)
        .await
        .map_err(|e| ShimError::Internal(format!("request task: {e}")))?
}

fn id(field: &'static str, value: &str) -> Result<Id, ShimError> {
    Ok(Id::parse(field, value)?)
}

/// The process a request names (`exec_id` empty: the init).
fn process(container: &str, exec: &str) -> Result<ProcessRef, ShimError> {
    Ok(ProcessRef {
        container: id("id", container)?,
        exec: match exec.is_empty() {
            true => None,
            false => Some(id("exec_id", exec)?),
        },
    })
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

fn api_status(s: Status) -> ApiStatus {
    match s {
        Status::Creating => ApiStatus::UNKNOWN,
        Status::Created | Status::Starting => ApiStatus::CREATED,
        Status::Running => ApiStatus::RUNNING,
        Status::Paused => ApiStatus::PAUSED,
        Status::Stopped | Status::Deleting => ApiStatus::STOPPED,
    }
}

/// Logs a failure (expected ones at debug level) and maps it to its ttrpc code.
fn reply<T>(what: &str, r: Result<T, ShimError>) -> TtrpcResult<T> {
    r.map_err(|e| {
        match e.code() {
            ttrpc::Code::NOT_FOUND | ttrpc::Code::FAILED_PRECONDITION => log::debug!("{what}: {e}"),
            _ => log::warn!("{what}: {e}"),
        }
        e.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let r = process(&req.id, &req.exec_id).and_then(|p| {
            let s = self.core.state(&p)?;
            Ok(StateResponse {
                id: p.event_id(),
                bundle: s.bundle,
                pid: s.pid,
                status: api_status(s.status).into(),
                stdin: s.stdio.stdin,
                stdout: s.stdio.stdout,
                stderr: s.stdio.stderr,
                terminal: s.stdio.terminal,
                exit_status: s.exit.as_ref().map(|e| e.status).unwrap_or(0),
                exited_at: s.exit.map(|e| e.at).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        });
        reply("state", r)
    }

    async fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        let r = async {
            let config_path = match req.options.as_ref() {
                Some(o) => crate::options::config_path(&o.type_url, &o.value)?,
                None => None,
            };
            let create = CreateRequest {
                id: id("id", &req.id)?,
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
                checkpoint: req.checkpoint.clone(),
                config_path,
            };
            let core = self.core.clone();
            let pid = detached(async move { core.create(create).await }).await?;
            Ok(CreateTaskResponse {
                pid,
                ..Default::default()
            })
        };
        reply(&format!("create {}", req.id), r.await)
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let r = async {
            let (core, p) = (self.core.clone(), process(&req.id, &req.exec_id)?);
            let pid = detached(async move { core.start(&p).await }).await?;
            Ok(StartResponse {
                pid,
                ..Default::default()
            })
        };
        reply(&format!("start {} {}", req.id, req.exec_id), r.await)
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let r = async {
            let (core, p) = (self.core.clone(), process(&req.id, &req.exec_id)?);
            let (pid, exit) = detached(async move { core.delete(&p).await }).await?;
            Ok(DeleteResponse {
                pid,
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            })
        };
        reply(&format!("delete {} {}", req.id, req.exec_id), r.await)
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let r = async {
            let pids = self.core.pids(&id("id", &req.id)?).await?;
            Ok(PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|pid| ProcessInfo {
                        pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        reply("pids", r.await)
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let r = async {
            let (core, id) = (self.core.clone(), id("id", &req.id)?);
            detached(async move { core.pause(&id, true).await })
                .await
                .map(|_| Empty::new())
        };
        reply("pause", r.await)
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let r = async {
            let (core, id) = (self.core.clone(), id("id", &req.id)?);
            detached(async move { core.pause(&id, false).await })
                .await
                .map(|_| Empty::new())
        };
        reply("resume", r.await)
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: containerd_shim::api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        let e = ShimError::Unimplemented("checkpoint is not implemented by vmbox".into());
        reply("checkpoint", Err(e))
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let r = async {
            let p = process(&req.id, &req.exec_id)?;
            self.core.kill(&p, req.signal, req.all).await.map(|_| Empty::new())
        };
        reply("kill", r.await)
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let r = (|| {
            if req.exec_id.is_empty() {
                return Err(ShimError::Invalid("exec_id: empty".into()));
            }
            let p = process(&req.id, &req.exec_id)?;
            let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
            let paths = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
            self.core.exec(&p, spec, paths).map(|_| Empty::new())
        })();
        reply("exec", r)
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let r = async {
            let p = process(&req.id, &req.exec_id)?;
            self.core
                .resize_pty(&p, req.height, req.width)
                .await
                .map(|_| Empty::new())
        };
        reply("resize_pty", r.await)
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let r = process(&req.id, &req.exec_id).and_then(|p| match req.stdin {
            true => self.core.close_io(&p),
            false => Ok(()),
        });
        reply("close_io", r.map(|_| Empty::new()))
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let r = async {
            let resources = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
            self.core
                .update(&id("id", &req.id)?, resources)
                .await
                .map(|_| Empty::new())
        };
        reply("update", r.await)
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let r = async {
            let exit = self.core.wait(&process(&req.id, &req.exec_id)?).await?;
            Ok(WaitResponse {
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            })
        };
        reply("wait", r.await)
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let r = async {
            let s = self.core.stats(&id("id", &req.id)?).await?;
            let value = metrics::to_cgroup_v2(&s)
                .write_to_bytes()
                .map_err(|e| ShimError::Internal(format!("encode metrics: {e}")))?;
            Ok(StatsResponse {
                stats: Some(Any {
                    type_url: metrics::TYPE_URL.into(),
                    value,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
        };
        reply("stats", r.await)
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let pid = Id::parse("id", &req.id)
            .ok()
            .and_then(|i| self.core.pid(&i))
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after every Delete; the shim stays while it serves a container.
        let (core, exit) = (self.core.clone(), self.exit.clone());
        // In a task of its own: a Shutdown containerd gives up on still ends the shim.
        let _ = tokio::spawn(async move {
            if core.shutdown_if_empty().await {
                exit.signal();
            }
        })
        .await;
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_once_at_the_boundary_naming_the_field() {
        let p = process(&"f".repeat(64), &"e".repeat(64)).unwrap();
        assert_eq!(p.event_id(), "e".repeat(64));
        assert!(process("a", "").unwrap().exec.is_none(), "an empty exec_id is the init");
        for (c, e, field) in [
            ("a/b", "", "id "),
            ("..", "", "id "),
            ("a", "x,y", "exec_id "),
            ("a", ".e", "exec_id "),
        ] {
            let err = process(c, e).unwrap_err();
            assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT, "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    #[tokio::test]
    async fn a_request_containerd_gives_up_on_still_finishes() {
        let gate = std::sync::Arc::new(tokio::sync::Notify::new());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let g = gate.clone();
        let request = detached(async move {
            g.notified().await;
            let _ = tx.send(());
            Ok(())
        });
        // containerd's deadline: ttrpc drops the request's future.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), request)
            .await
            .is_err());
        gate.notify_one();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx)
            .await
            .expect("the transition finished after its request was dropped")
            .unwrap();
    }

    #[test]
    fn in_between_states_map_onto_containerds() {
        assert_eq!(api_status(Status::Starting), ApiStatus::CREATED);
        assert_eq!(api_status(Status::Deleting), ApiStatus::STOPPED);
        assert_eq!(api_status(Status::Paused), ApiStatus::PAUSED);
    }
}
