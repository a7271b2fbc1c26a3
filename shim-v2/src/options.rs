//! containerd's runtime options, as a shim of a non-runc runtime receives them.
//!
//! containerd's CRI plugin passes a runtime handler's `options` table (in containerd's
//! config, `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<handler>.options]`)
//! as CRI's `runtimeoptions.v1.Options` message in CreateTask's `options`; so does
//! `ctr run --runtime-config-path`. Its `ConfigPath` names the vmbox config file of that
//! runtime handler (Kata reads the same field), so two RuntimeClasses can boot different
//! VM sizes or kernels with one shim binary.

use std::path::PathBuf;

use crate::error::ShimError;

/// In a container's bundle: the config path its Create named, for `delete` after the shim
/// died (the runtime options do not reach `delete`). runc's shim keeps `options.json` there.
pub const BUNDLE_CONFIG_PATH: &str = "vmbox-config-path";

/// The message's type URL (`runtimeoptions.v1.Options`, package of CRI's runtimeoptions).
pub const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// The `config_path` field (2) of `runtimeoptions.v1.Options`; `None` for another type or
/// an empty path. Errors: a malformed message, a relative path (InvalidArgument).
pub fn config_path(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>, ShimError> {
    if type_url.rsplit('/').next() != Some(RUNTIME_OPTIONS) {
        if !type_url.is_empty() {
            log::debug!("runtime options of type {type_url:?} ignored");
        }
        return Ok(None);
    }
    let bad = |e: protobuf::Error| ShimError::Invalid(format!("runtime options ({RUNTIME_OPTIONS}): {e}"));
    let mut input = protobuf::CodedInputStream::from_bytes(value);
    let mut path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        match tag >> 3 {
            2 if tag & 7 == 2 => path = input.read_string().map_err(bad)?,
            _ => {
                let wire = protobuf::rt::WireType::new(tag & 7).ok_or_else(|| {
                    ShimError::Invalid(format!(
                        "runtime options ({RUNTIME_OPTIONS}): bad wire type in tag {tag}"
                    ))
                })?;
                input.skip_field(wire).map_err(bad)?
            }
        }
    }
    if path.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(ShimError::Invalid(format!(
            "runtime options: ConfigPath {} must be an absolute path",
            path.display()
        )));
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `runtimeoptions.v1.Options{type_url: 1, config_path: 2, config_body: 3}`.
    fn encode(type_url: &str, path: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut os = protobuf::CodedOutputStream::vec(&mut out);
        os.write_string(1, type_url).unwrap();
        os.write_string(2, path).unwrap();
        os.write_bytes(3, body).unwrap();
        os.flush().unwrap();
        drop(os);
        out
    }

    #[test]
    fn the_config_path_is_read_and_other_types_ignored() {
        let v = encode("io.containerd.vmbox.v2", "/etc/vmbox/small.toml", b"x = 1");
        assert_eq!(
            config_path(RUNTIME_OPTIONS, &v).unwrap(),
            Some(PathBuf::from("/etc/vmbox/small.toml"))
        );
        assert_eq!(config_path("containerd.runc.v1.Options", &v).unwrap(), None);
        assert_eq!(config_path(RUNTIME_OPTIONS, &encode("", "", b"")).unwrap(), None);
    }

    #[test]
    fn bad_options_are_invalid_arguments() {
        let e = config_path(RUNTIME_OPTIONS, &encode("", "small.toml", b"")).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
        let e = config_path(RUNTIME_OPTIONS, &[0x12, 0x40, b'/']).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
    }
}
