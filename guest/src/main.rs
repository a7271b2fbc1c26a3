//! vmbox-initramfs AGENT OUT: writes the guest initramfs holding AGENT as /init,
//! LZ4-compressed (legacy format, which the guest kernel unpacks).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, agent, out] = args.as_slice() else {
        eprintln!("usage: vmbox-initramfs AGENT_BINARY OUT_INITRAMFS");
        return ExitCode::from(2);
    };
    match run(agent, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmbox-initramfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(agent: &str, out: &str) -> Result<(), vmbox_guest::InitramfsError> {
    let data = std::fs::read(agent).map_err(|source| vmbox_guest::InitramfsError::Read {
        path: agent.into(),
        source,
    })?;
    let tmp = format!("{out}.tmp");
    let mut cpio = Vec::with_capacity(data.len() + 4096);
    vmbox_guest::initramfs(&mut cpio, &data)?;
    if let Some(dir) = std::path::Path::new(out).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(write(&dir.to_string_lossy()))?;
        }
    }
    let mut f = std::fs::File::create(&tmp).map_err(write(&tmp))?;
    std::io::Write::write_all(&mut f, &vmbox_guest::lz4_legacy(&cpio)).map_err(write(&tmp))?;
    f.sync_all().map_err(write(&tmp))?;
    std::fs::rename(&tmp, out).map_err(write(out))?;
    Ok(())
}

/// Maps an I/O error on `path` to the error naming it.
fn write(path: &str) -> impl FnOnce(std::io::Error) -> vmbox_guest::InitramfsError + '_ {
    move |source| vmbox_guest::InitramfsError::WriteFile {
        path: path.into(),
        source,
    }
}
