//! vmbox-initramfs AGENT OUT: writes the guest initramfs holding AGENT as /init.

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
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    vmbox_guest::initramfs(&mut f, &data)?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}
