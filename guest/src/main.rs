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
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, &vmbox_guest::lz4_legacy(&cpio))?;
    f.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}
