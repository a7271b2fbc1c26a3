//! The guest image: a "newc" cpio archive (the initramfs format the kernel unpacks) with
//! vmbox-agent as `/init` and the few directories and device nodes PID 1 needs before it
//! can mount devtmpfs. Written here rather than with `cpio`/`gen_init_cpio` so the build
//! needs no root (device nodes) and is byte-for-byte reproducible (mtime 0, fixed inodes).

use std::io::Write;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the initramfs: {0}")]
    Write(#[from] std::io::Error),
    /// Creating, writing or renaming the output file `path` failed.
    #[error("cannot write the initramfs {path}: {source}")]
    WriteFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One entry of the archive.
pub enum Entry<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    CharDev {
        path: &'a str,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writes `entries` as a newc cpio archive, with the trailer.
pub fn write_cpio<W: Write>(out: &mut W, entries: &[Entry]) -> std::io::Result<()> {
    let mut written = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let (path, mode, data, rdev): (&str, u32, &[u8], (u32, u32)) = match e {
            Entry::Dir { path, mode } => (path, S_IFDIR | mode, &[], (0, 0)),
            Entry::File { path, mode, data } => (path, S_IFREG | mode, data, (0, 0)),
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => (path, S_IFCHR | mode, &[], (*major, *minor)),
        };
        written += write_entry(out, i as u32 + 1, path, mode, data, rdev)?;
    }
    written += write_entry(out, 0, "TRAILER!!!", 0, &[], (0, 0))?;
    // Pad the archive to a 512-byte block, as cpio does.
    out.write_all(&vec![0u8; (512 - written % 512) % 512])
}

fn write_entry<W: Write>(
    out: &mut W,
    ino: u32,
    path: &str,
    mode: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> std::io::Result<usize> {
    let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
    let name_len = path.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{name_len:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    let mut n = 0;
    out.write_all(header.as_bytes())?;
    out.write_all(path.as_bytes())?;
    out.write_all(&[0])?;
    n += header.len() + name_len;
    let pad = (4 - n % 4) % 4;
    out.write_all(&[0u8; 3][..pad])?;
    n += pad;
    out.write_all(data)?;
    n += data.len();
    let pad = (4 - n % 4) % 4;
    out.write_all(&[0u8; 3][..pad])?;
    Ok(n + pad)
}

/// The initramfs for `agent`: the directories PID 1 mounts on and `/dev/console`, which
/// the kernel opens for init's stdio before any devtmpfs exists.
pub fn initramfs<W: Write>(out: &mut W, agent: &[u8]) -> std::io::Result<()> {
    write_cpio(
        out,
        &[
            Entry::Dir {
                path: "dev",
                mode: 0o755,
            },
            Entry::CharDev {
                path: "dev/console",
                mode: 0o600,
                major: 5,
                minor: 1,
            },
            Entry::CharDev {
                path: "dev/null",
                mode: 0o666,
                major: 1,
                minor: 3,
            },
            Entry::Dir {
                path: "proc",
                mode: 0o555,
            },
            Entry::Dir {
                path: "sys",
                mode: 0o555,
            },
            Entry::Dir {
                path: "run",
                mode: 0o755,
            },
            Entry::Dir {
                path: "tmp",
                mode: 0o1777,
            },
            Entry::File {
                path: "init",
                mode: 0o755,
                data: agent,
            },
        ],
    )
}

/// Magic number of the legacy LZ4 format (`lz4 -l`), the one the kernel unpacks.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// The kernel's decompressor takes chunks of at most 8 MiB uncompressed.
const LZ4_LEGACY_CHUNK: usize = 8 << 20;

/// Compresses `data` in the legacy LZ4 format: the magic, then per chunk of at most 8 MiB
/// its compressed size (u32, little endian) and one LZ4 block. LZ4 because the guest
/// unpacks its initramfs under emulation, where LZ4 is the cheapest of the kernel's
/// decompressors.
pub fn lz4_legacy(data: &[u8]) -> Vec<u8> {
    let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(LZ4_LEGACY_CHUNK) {
        let block = lz4_flex::block::compress(chunk);
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&block);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_legacy_round_trips_across_chunks() {
        let data: Vec<u8> = (0..(LZ4_LEGACY_CHUNK + 12345)).map(|i| (i % 251) as u8).collect();
        let z = lz4_legacy(&data);
        assert_eq!(&z[..4], &[0x02, 0x21, 0x4c, 0x18]);
        let (mut at, mut back) = (4, Vec::new());
        while at < z.len() {
            let n = u32::from_le_bytes(z[at..at + 4].try_into().unwrap()) as usize;
            at += 4;
            back.extend(lz4_flex::block::decompress(&z[at..at + n], LZ4_LEGACY_CHUNK).unwrap());
            at += n;
        }
        assert_eq!(back, data);
        assert!(z.len() < data.len() / 10);
    }

    #[test]
    fn entries_are_aligned_and_archive_is_padded() {
        let mut buf = Vec::new();
        initramfs(&mut buf, b"#!agent").unwrap();
        assert_eq!(buf.len() % 512, 0);
        assert!(buf.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("dev/console\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The agent's bytes start on a 4-byte boundary.
        let at = buf.windows(7).position(|w| w == b"#!agent").unwrap();
        assert_eq!(at % 4, 0);
    }

    #[test]
    fn output_is_reproducible() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        initramfs(&mut a, b"x").unwrap();
        initramfs(&mut b, b"x").unwrap();
        assert_eq!(a, b);
    }
}
