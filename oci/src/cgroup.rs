//! The host cgroup of a sandbox: where its VMM and daemons run, so the kubelet's pod
//! accounting, RuntimeClass overhead and CRI's PodSandboxStats see them.
//!
//! The sandbox container's `linux.cgroupsPath` comes in the two forms runc takes:
//! - cgroupfs: `/kubepods/besteffort/pod<uid>/<id>` (absolute; a relative path is taken
//!   from the root too, as vmbox's shim has no cgroup of its own to nest under);
//! - systemd: `slice:prefix:name`, e.g. `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`,
//!   which is the cgroupfs path `kubepods.slice/kubepods-besteffort.slice/
//!   kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope` (systemd's own
//!   naming, as runc's systemd driver expands it). vmbox creates that directory itself.

use std::path::{Component, PathBuf};

use oci_spec::runtime::Spec;

use crate::OciError;

/// The sandbox's cgroup, relative to each hierarchy's root; `None` if the spec has none.
///
/// Errors name `linux.cgroupsPath`: a `..` component, or a malformed systemd form.
pub fn host_cgroup(spec: &Spec) -> Result<Option<PathBuf>, OciError> {
    let Some(raw) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) else {
        return Ok(None);
    };
    let text = raw.display().to_string();
    if text.is_empty() {
        return Ok(None);
    }
    let bad = |reason: &str| OciError::Field {
        field: "linux.cgroupsPath".into(),
        reason: format!("{text:?}: {reason}"),
    };
    let parts: Vec<&str> = text.split(':').collect();
    let path = if parts.len() == 3 && !text.starts_with('/') {
        let (slice, prefix, name) = (parts[0], parts[1], parts[2]);
        if name.is_empty() {
            return Err(bad("the systemd form slice:prefix:name has an empty name"));
        }
        let mut p = expand_slice(if slice.is_empty() { "system.slice" } else { slice }).map_err(|e| bad(&e))?;
        // runc's unit name: a scope `<prefix>-<name>.scope` unless the name is a slice.
        p.push(if name.ends_with(".slice") {
            name.to_string()
        } else {
            format!("{prefix}-{name}.scope")
        });
        p
    } else if text.contains(':') {
        return Err(bad("neither a path nor the systemd form slice:prefix:name"));
    } else {
        PathBuf::from(text.trim_start_matches('/'))
    };
    if !path.components().all(|c| matches!(c, Component::Normal(_))) || path.as_os_str().is_empty() {
        return Err(bad("must name a cgroup below the root, without '..'"));
    }
    Ok(Some(path))
}

/// systemd's slice nesting: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`; `-.slice`
/// is the root.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(format!("slice {slice:?} does not end in .slice"));
    };
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") || stem.contains('/') {
        return Err(format!("slice {slice:?} is not a valid systemd slice name"));
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(path: &str) -> Spec {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some(PathBuf::from(path)));
        spec.set_linux(Some(linux));
        spec
    }

    #[test]
    fn both_forms_become_a_path_below_the_root() {
        let p = |s: &str| host_cgroup(&with(s)).unwrap().unwrap().display().to_string();
        assert_eq!(p("/kubepods/besteffort/podu/abc"), "kubepods/besteffort/podu/abc");
        assert_eq!(p("/default/c1"), "default/c1");
        assert_eq!(
            p("kubepods-besteffort-podu.slice:cri-containerd:abc"),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu.slice/cri-containerd-abc.scope"
        );
        assert_eq!(p("-.slice:vmbox:x"), "vmbox-x.scope");
        assert_eq!(p("machine.slice:vmbox:x.slice"), "machine.slice/x.slice");
        let mut none = Spec::default();
        none.set_linux(None);
        assert!(host_cgroup(&none).unwrap().is_none());
    }

    #[test]
    fn escapes_and_malformed_forms_are_named() {
        for bad in ["/a/../../etc", "a--b.slice:p:n", "x.slice:p:", "a:b"] {
            let e = host_cgroup(&with(bad)).unwrap_err().to_string();
            assert!(e.contains("linux.cgroupsPath"), "{bad}: {e}");
        }
    }
}
