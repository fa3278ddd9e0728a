//! Just enough ELF64 reading to validate our two executables: the kernel must carry the
//! PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, owner "Xen"), and the agent must be static
//! (no `PT_INTERP`: there is no dynamic loader in the initramfs).
//!
//! Every offset and size read from the file is bounds-checked; a malformed file yields an
//! error, never a panic.

/// ELF note type of the PVH 32-bit entry point (Xen's `XEN_ELFNOTE_PHYS32_ENTRY`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;
/// Upper bound on program/section headers and notes we walk (vmlinux has a handful).
const MAX_HEADERS: usize = 4096;
const MAX_NOTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file (bad magic)")]
    BadMagic,
    #[error("unsupported ELF: {0}")]
    Unsupported(&'static str),
    #[error("truncated or malformed ELF: {what} at offset {offset:#x}")]
    Malformed { what: &'static str, offset: u64 },
}

/// What we learned from an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_type`: 2 = executable, 3 = shared object / PIE.
    pub file_type: u16,
    pub entry: u64,
    /// Path in `PT_INTERP`, if any (a dynamically linked program).
    pub interpreter: Option<String>,
    /// Address in the Xen PHYS32_ENTRY note, if any (a PVH-bootable kernel).
    pub pvh_entry: Option<u64>,
}

impl ElfInfo {
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none()
    }
}

fn slice<'a>(b: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let bad = ElfError::Malformed { what, offset: off };
    let start = usize::try_from(off).map_err(|_| ElfError::Malformed { what, offset: off })?;
    let len = usize::try_from(len).map_err(|_| ElfError::Malformed { what, offset: off })?;
    let end = start
        .checked_add(len)
        .ok_or(ElfError::Malformed { what, offset: off })?;
    b.get(start..end).ok_or(bad)
}

fn u16_at(b: &[u8], off: u64, what: &'static str) -> Result<u16, ElfError> {
    let s = slice(b, off, 2, what)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: u64, what: &'static str) -> Result<u32, ElfError> {
    let s = slice(b, off, 4, what)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: u64, what: &'static str) -> Result<u64, ElfError> {
    let s = slice(b, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// Walks a note area and returns the PVH entry if a Xen PHYS32_ENTRY note is present.
fn find_pvh_note(area: &[u8], base: u64) -> Result<Option<u64>, ElfError> {
    let mut off = 0usize;
    for _ in 0..MAX_NOTES {
        if off + 12 > area.len() {
            return Ok(None);
        }
        let at = base + off as u64;
        let namesz = u32_at(area, off as u64, "note namesz")? as usize;
        let descsz = u32_at(area, off as u64 + 4, "note descsz")? as usize;
        let ntype = u32_at(area, off as u64 + 8, "note type")?;
        let name_off = off + 12;
        let desc_off =
            name_off
                .checked_add(namesz.next_multiple_of(4))
                .ok_or(ElfError::Malformed {
                    what: "note name",
                    offset: at,
                })?;
        let next = desc_off
            .checked_add(descsz.next_multiple_of(4))
            .ok_or(ElfError::Malformed {
                what: "note desc",
                offset: at,
            })?;
        if next > area.len() {
            return Err(ElfError::Malformed {
                what: "note extends past its area",
                offset: at,
            });
        }
        let name = &area[name_off..name_off + namesz];
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            let desc = &area[desc_off..desc_off + descsz];
            let entry = match descsz {
                4 => u64::from(u32::from_le_bytes([desc[0], desc[1], desc[2], desc[3]])),
                8 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(desc);
                    u64::from_le_bytes(a)
                }
                _ => {
                    return Err(ElfError::Malformed {
                        what: "PVH note size",
                        offset: at,
                    });
                }
            };
            return Ok(Some(entry));
        }
        off = next;
    }
    Ok(None)
}

/// Parses an x86-64 little-endian ELF64 file.
pub fn parse(b: &[u8]) -> Result<ElfInfo, ElfError> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    if b[4] != 2 {
        return Err(ElfError::Unsupported("not ELF64"));
    }
    if b[5] != 1 {
        return Err(ElfError::Unsupported("not little-endian"));
    }
    let file_type = u16_at(b, 0x10, "e_type")?;
    if u16_at(b, 0x12, "e_machine")? != EM_X86_64 {
        return Err(ElfError::Unsupported("not x86-64"));
    }
    let entry = u64_at(b, 0x18, "e_entry")?;
    let phoff = u64_at(b, 0x20, "e_phoff")?;
    let shoff = u64_at(b, 0x28, "e_shoff")?;
    let phentsize = u64::from(u16_at(b, 0x36, "e_phentsize")?);
    let phnum = usize::from(u16_at(b, 0x38, "e_phnum")?);
    let shentsize = u64::from(u16_at(b, 0x3a, "e_shentsize")?);
    let shnum = usize::from(u16_at(b, 0x3c, "e_shnum")?);
    if phnum > MAX_HEADERS || shnum > MAX_HEADERS {
        return Err(ElfError::Unsupported("too many headers"));
    }
    if phnum > 0 && phentsize < 56 {
        return Err(ElfError::Malformed {
            what: "e_phentsize",
            offset: 0x36,
        });
    }

    let mut interpreter = None;
    let mut pvh_entry = None;
    for i in 0..phnum as u64 {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfError::Malformed {
                what: "program header",
                offset: phoff,
            })?;
        let p_type = u32_at(b, ph, "p_type")?;
        let p_offset = u64_at(b, ph + 8, "p_offset")?;
        let p_filesz = u64_at(b, ph + 32, "p_filesz")?;
        match p_type {
            PT_INTERP => {
                let s = slice(b, p_offset, p_filesz, "PT_INTERP")?;
                let s = s.split(|&c| c == 0).next().unwrap_or_default();
                interpreter = Some(String::from_utf8_lossy(s).into_owned());
            }
            PT_NOTE if pvh_entry.is_none() => {
                let area = slice(b, p_offset, p_filesz, "PT_NOTE")?;
                pvh_entry = find_pvh_note(area, p_offset)?;
            }
            _ => {}
        }
    }
    // Some linkers leave notes only in sections; look there too.
    if pvh_entry.is_none() && shoff != 0 && shnum > 0 {
        if shentsize < 64 {
            return Err(ElfError::Malformed {
                what: "e_shentsize",
                offset: 0x3a,
            });
        }
        for i in 0..shnum as u64 {
            let sh = shoff
                .checked_add(i * shentsize)
                .ok_or(ElfError::Malformed {
                    what: "section header",
                    offset: shoff,
                })?;
            if u32_at(b, sh + 4, "sh_type")? != SHT_NOTE {
                continue;
            }
            let off = u64_at(b, sh + 0x18, "sh_offset")?;
            let size = u64_at(b, sh + 0x20, "sh_size")?;
            let area = slice(b, off, size, "SHT_NOTE")?;
            pvh_entry = find_pvh_note(area, off)?;
            if pvh_entry.is_some() {
                break;
            }
        }
    }
    Ok(ElfInfo {
        file_type,
        entry,
        interpreter,
        pvh_entry,
    })
}

/// Builders of small synthetic ELF files, for tests in this crate.
#[cfg(test)]
pub(crate) mod synth {
    /// One program header to emit: type and contents.
    pub(crate) struct Seg {
        pub p_type: u32,
        pub data: Vec<u8>,
    }

    pub(crate) fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ntype.to_le_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend_from_slice(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    /// An x86-64 ELF64 with the given segments (no sections).
    pub(crate) fn elf(segs: &[Seg]) -> Vec<u8> {
        let phoff = 64u64;
        let data_start = phoff + 56 * segs.len() as u64;
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[6] = 1;
        h[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        h[0x18..0x20].copy_from_slice(&0x1000u64.to_le_bytes());
        h[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        h[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        let mut body = Vec::new();
        let mut off = data_start;
        for s in segs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&s.p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&off.to_le_bytes());
            ph[32..40].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
            h.extend_from_slice(&ph);
            body.extend_from_slice(&s.data);
            off += s.data.len() as u64;
        }
        h.extend_from_slice(&body);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::synth::{Seg, elf, note};
    use super::*;

    #[test]
    fn finds_pvh_note_among_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8]);
        notes.extend(note(b"Xen\0", 5, b"linux\0"));
        notes.extend(note(b"Xen\0", 18, &0x0100_0abcu64.to_le_bytes()));
        let info = parse(&elf(&[Seg {
            p_type: PT_NOTE,
            data: notes,
        }]))
        .unwrap();
        assert_eq!(info.pvh_entry, Some(0x0100_0abc));
        assert!(info.is_static());
        assert_eq!(info.entry, 0x1000);
    }

    #[test]
    fn four_byte_pvh_note_and_wrong_owner() {
        let info = parse(&elf(&[Seg {
            p_type: PT_NOTE,
            data: note(b"Xen\0", 18, &0x1234u32.to_le_bytes()),
        }]))
        .unwrap();
        assert_eq!(info.pvh_entry, Some(0x1234));
        let info = parse(&elf(&[Seg {
            p_type: PT_NOTE,
            data: note(b"Xyz\0", 18, &0x1234u32.to_le_bytes()),
        }]))
        .unwrap();
        assert_eq!(info.pvh_entry, None);
    }

    #[test]
    fn interp_means_dynamic() {
        let info = parse(&elf(&[Seg {
            p_type: PT_INTERP,
            data: b"/lib64/ld-linux-x86-64.so.2\0".to_vec(),
        }]))
        .unwrap();
        assert_eq!(
            info.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(!info.is_static());
        assert_eq!(info.pvh_entry, None);
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        assert!(matches!(parse(b"hello"), Err(ElfError::BadMagic)));
        let good = elf(&[Seg {
            p_type: PT_NOTE,
            data: note(b"Xen\0", 18, &[0; 8]),
        }]);
        // Every truncation must fail cleanly.
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        // A note whose descsz points past the segment.
        let mut bad = note(b"Xen\0", 18, &[0; 8]);
        bad[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            parse(&elf(&[Seg {
                p_type: PT_NOTE,
                data: bad
            }])),
            Err(ElfError::Malformed { .. })
        ));
        let mut arm = good.clone();
        arm[0x12] = 183;
        assert!(matches!(parse(&arm), Err(ElfError::Unsupported(_))));
    }

    #[test]
    fn real_host_binaries() {
        // Debian's busybox-static (installed by setup) is static; /bin/ls is dynamic.
        if let Ok(b) = std::fs::read("/bin/busybox") {
            assert!(parse(&b).unwrap().is_static());
        }
        let ls = std::fs::read("/bin/ls").unwrap();
        let info = parse(&ls).unwrap();
        assert!(info.interpreter.unwrap().contains("ld-linux"));
    }
}
