//! The last step of every container process (init or exec, with or without a tty): once
//! libcontainer has set up namespaces, mounts, user and seccomp, find the program and
//! execve it, in the state runc leaves a process in.
//!
//! Two differences from libcontainer's default executor, both runc parity:
//! - **Signals.** A process inherits ignored dispositions and the blocked mask across
//!   execve. The helper is a Rust program (its runtime ignores SIGPIPE) started by the
//!   agent, so without a reset every container process started with SIGPIPE ignored and
//!   `yes | head` never ended. Here every signal goes back to its default disposition and
//!   the mask is emptied, immediately before execve.
//! - **Program lookup.** As runc (Go's `exec.LookPath`): a name containing `/` is used as
//!   it is and needs no `PATH`; a bare name is searched in the spec's `PATH` and fails with
//!   runc's "executable file not found in $PATH" when there is none. libcontainer refused
//!   every spec without `PATH`, even `/bin/sh`. Nothing is added to the environment.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;

/// vmbox's libcontainer executor (see the module documentation).
#[derive(Clone, Default)]
pub struct Workload;

impl Executor for Workload {
    /// The spec's environment as it is, plus `HOME=/` when neither the spec nor the
    /// user's passwd entry (which libcontainer looked up) gives one: runc's default.
    fn setup_envs(
        &self,
        mut envs: std::collections::HashMap<String, String>,
    ) -> Result<(), libcontainer::workload::ExecutorSetEnvsError> {
        // set_var panics on these; runc refuses them too. The agent refuses them before
        // libcontainer runs (container.rs, check_env); this is the last line. Never the
        // value in a message: it may be a secret.
        if let Some((k, _)) = envs
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(libcontainer::workload::ExecutorSetEnvsError::Other(format!(
                "process.env: invalid environment variable {:?}",
                k.chars().take(64).collect::<String>()
            )));
        }
        // An empty HOME counts as unset, as for runc.
        if envs.get("HOME").is_none_or(|h| h.is_empty()) {
            envs.insert("HOME".into(), "/".into());
        }
        for (k, _) in std::env::vars_os() {
            // SAFETY: the container's process is single-threaded here (libcontainer's
            // init, between clone and execve).
            unsafe { std::env::remove_var(k) };
        }
        for (k, v) in envs {
            // SAFETY: as above.
            unsafe { std::env::set_var(k, v) };
        }
        Ok(())
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let (args, env) = args_and_env(spec).map_err(ExecutorValidationError::ArgValidationError)?;
        lookup(&args[0], path_of(&env)).map_err(ExecutorValidationError::ArgValidationError)?;
        Ok(())
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let (args, env) = args_and_env(spec).map_err(ExecutorError::Other)?;
        let program = lookup(&args[0], path_of(&env)).map_err(ExecutorError::Other)?;
        let c = |s: &str, what: &str| {
            CString::new(s).map_err(|_| ExecutorError::Other(format!("{what} {s:?} contains a NUL byte")))
        };
        let program_c = c(&program.to_string_lossy(), "program")?;
        let argv = args.iter().map(|a| c(a, "argument")).collect::<Result<Vec<_>, _>>()?;
        reset_signals();
        // execv keeps the environment libcontainer set from the spec (setup_envs).
        let e = nix::unistd::execv(&program_c, &argv).unwrap_err();
        Err(ExecutorError::Other(format!("exec {}: {e}", program.display())))
    }
}

fn args_and_env(spec: &Spec) -> Result<(Vec<String>, Vec<String>), String> {
    let p = spec.process().as_ref().ok_or("the spec has no process")?;
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err("process.args is empty: no program to run".into());
    }
    Ok((args, p.env().clone().unwrap_or_default()))
}

/// The value of `PATH` in an OCI `process.env` list, if it is set.
fn path_of(env: &[String]) -> Option<&str> {
    env.iter().rev().find_map(|e| e.strip_prefix("PATH="))
}

/// Finds `name` as runc does: with a `/` as given, else in `path`'s directories (an
/// empty entry is the working directory). Errors name the program and the reason.
pub fn lookup(name: &str, path: Option<&str>) -> Result<PathBuf, String> {
    if name.contains('/') {
        return match executable(Path::new(name)) {
            Ok(()) => Ok(PathBuf::from(name)),
            Err(e) => Err(format!("exec: {name:?}: {e}")),
        };
    }
    let not_found = || format!("exec: {name:?}: executable file not found in $PATH");
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return Err(not_found());
    };
    for dir in path.split(':') {
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(name);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(not_found())
}

/// A regular file with an execute bit, as Go's exec.LookPath checks.
fn executable(p: &Path) -> Result<(), String> {
    let m = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if m.is_dir() {
        return Err("is a directory".into());
    }
    if m.permissions().mode() & 0o111 == 0 {
        return Err("permission denied".into());
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
compile_error!("reset_signals passes x86_64's kernel sigaction layout: check it for this architecture");

/// Every signal to its default disposition and an empty blocked mask. The raw system
/// call, because glibc refuses to touch the signals it reserves (32 and 33), which were
/// found ignored in container processes too.
pub fn reset_signals() {
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads one kernel sigaction of the size passed (the kernel's
        // sigset is 8 bytes on x86_64) and writes nothing (null old action).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_with_a_slash_needs_no_path_variable() {
        assert_eq!(lookup("/bin/sh", None).unwrap(), PathBuf::from("/bin/sh"));
        assert!(lookup("/no/such/program", None)
            .unwrap_err()
            .contains("/no/such/program"));
    }

    #[test]
    fn a_bare_name_is_searched_in_path_only() {
        assert_eq!(
            lookup("sh", Some("/nonexistent:/bin")).unwrap(),
            PathBuf::from("/bin/sh")
        );
        let e = lookup("sh", None).unwrap_err();
        assert!(e.contains("executable file not found in $PATH"), "{e}");
        assert!(lookup("sh", Some("")).is_err());
        assert!(lookup("no-such-program-vmbox", Some("/bin:/usr/bin")).is_err());
    }

    #[test]
    fn directories_and_plain_files_are_not_programs() {
        assert!(lookup("/tmp", None).unwrap_err().contains("is a directory"));
        let f = std::env::temp_dir().join(format!("vmbox-workload-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert!(lookup(&f.to_string_lossy(), None)
            .unwrap_err()
            .contains("permission denied"));
        std::fs::remove_file(&f).unwrap();
    }

    #[test]
    fn the_last_path_entry_wins() {
        let env = vec!["PATH=/a".to_string(), "X=1".to_string(), "PATH=/b".to_string()];
        assert_eq!(path_of(&env), Some("/b"));
        assert_eq!(path_of(&["HOME=/".to_string()]), None);
    }
}
