//! What xenblkd checks in a qcow2 header before it lets imago open the image.
//!
//! imago refuses unknown incompatible feature bits, but it does not look at
//! `crypt_method` (an encrypted image would be served as ciphertext), and its messages do
//! not say which file of a backing chain is at fault. So each layer's header is read here
//! first, and every feature xenblkd cannot serve is refused with the image and the feature
//! named. The layout is QEMU's `docs/interop/qcow2.txt` (all fields big-endian).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
const V2_HEADER_LEN: usize = 72;
const V3_MIN_HEADER_LEN: usize = 104;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: usize = 1023;
/// Largest cluster (2 MiB, `cluster_bits` 21) and smallest (512 bytes).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;

/// Why a header was refused: an image xenblkd does not understand, or a feature it does
/// not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// Malformed or not qcow2 at all.
    Invalid(String),
    /// A feature we refuse, named for the operator.
    Unsupported(String),
}

/// The facts of a qcow2 header that decide whether and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Where the metadata is, for `refcheck` (unchecked here).
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits (4 in version 2).
    pub refcount_order: u32,
}

impl Header {
    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// The first `len` bytes of the file (fewer if it is shorter), read through a page-aligned
/// buffer so that a file opened with O_DIRECT reads too.
fn read_prefix(file: &File, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = crate::AlignedBuf::page_aligned(len.next_multiple_of(4096));
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf.as_mut_slice()[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf.as_slice()[..got.min(len)].to_vec())
}

/// True if the file starts with the qcow2 magic.
pub(crate) fn has_qcow2_magic(file: &File) -> std::io::Result<bool> {
    let mut b = [0u8; 4];
    match file.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(u32::from_be_bytes(b) == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads and checks the header of the qcow2 image open as `file`.
pub(crate) fn read(file: &File) -> Result<Header, HeaderError> {
    let io = |e: std::io::Error| HeaderError::Invalid(format!("reading the header: {e}"));
    let fixed = read_prefix(file, V3_MIN_HEADER_LEN).map_err(io)?;
    if fixed.len() < V2_HEADER_LEN {
        return Err(HeaderError::Invalid(
            "too short for a qcow2 header".to_string(),
        ));
    }
    if be32(&fixed, 0) != MAGIC {
        return Err(HeaderError::Invalid("not a qcow2 image".to_string()));
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Unsupported(format!("qcow2 version {version}")));
    }
    let cluster_bits = be32(&fixed, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(HeaderError::Invalid(format!(
            "cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    let cluster_size = 1usize << cluster_bits;
    match be32(&fixed, 32) {
        0 => {}
        1 => return Err(HeaderError::Unsupported("encryption (AES)".to_string())),
        2 => return Err(HeaderError::Unsupported("encryption (LUKS)".to_string())),
        m => return Err(HeaderError::Unsupported(format!("encryption (method {m})"))),
    }

    // Everything else lives in the first cluster (header, extensions, backing name).
    let first = read_prefix(file, cluster_size).map_err(io)?;
    let first_len = first.len();

    let ext_start = if version == 3 {
        if first_len < V3_MIN_HEADER_LEN {
            return Err(HeaderError::Invalid("truncated version 3 header".into()));
        }
        let incompatible = be64(&first, 72);
        refuse_incompatible(incompatible)?;
        let header_length = be32(&first, 100) as usize;
        if header_length < V3_MIN_HEADER_LEN || header_length > first_len {
            return Err(HeaderError::Invalid(format!(
                "header_length {header_length} out of range"
            )));
        }
        header_length
    } else {
        V2_HEADER_LEN
    };

    let mut backing_format = None;
    let mut at = ext_start;
    loop {
        if at + 8 > first_len {
            // Version 2 images may have no extension area at all.
            if version == 2 {
                break;
            }
            return Err(HeaderError::Invalid(
                "header extensions run past the first cluster".into(),
            ));
        }
        let kind = be32(&first, at);
        let ext_len = be32(&first, at + 4) as usize;
        at += 8;
        if kind == EXT_END {
            break;
        }
        let end = at
            .checked_add(ext_len)
            .filter(|&e| e <= first_len)
            .ok_or_else(|| {
                HeaderError::Invalid("header extension runs past the first cluster".into())
            })?;
        let data = &first[at..end];
        match kind {
            EXT_BACKING_FORMAT => {
                backing_format = Some(
                    String::from_utf8(data.to_vec())
                        .map_err(|_| HeaderError::Invalid("backing format is not UTF-8".into()))?,
                );
            }
            EXT_FULL_DISK_ENCRYPTION => {
                return Err(HeaderError::Unsupported("encryption (LUKS)".into()))
            }
            EXT_EXTERNAL_DATA_FILE => {
                return Err(HeaderError::Unsupported("an external data file".into()))
            }
            _ => {}
        }
        at = end.next_multiple_of(8);
    }

    let backing_offset = be64(&first, 8);
    let backing_len = be32(&first, 16) as usize;
    let backing_file = if backing_offset == 0 {
        None
    } else {
        if backing_len == 0 || backing_len > MAX_BACKING_NAME {
            return Err(HeaderError::Invalid(format!(
                "backing file name length {backing_len}"
            )));
        }
        let start = usize::try_from(backing_offset)
            .ok()
            .filter(|&s| s.checked_add(backing_len).is_some_and(|e| e <= first_len))
            .ok_or_else(|| {
                HeaderError::Invalid("backing file name outside the first cluster".into())
            })?;
        let name = String::from_utf8(first[start..start + backing_len].to_vec())
            .map_err(|_| HeaderError::Invalid("backing file name is not UTF-8".into()))?;
        Some(name)
    };
    Ok(Header {
        version,
        cluster_bits,
        size: be64(&first, 24),
        backing_file,
        backing_format,
        l1_size: be32(&first, 36),
        l1_table_offset: be64(&first, 40),
        refcount_table_offset: be64(&first, 48),
        refcount_table_clusters: be32(&first, 56),
        refcount_order: if version == 3 { be32(&first, 96) } else { 4 },
    })
}

/// Names the incompatible features (qcow2.txt, "incompatible_features") we do not serve.
fn refuse_incompatible(bits: u64) -> Result<(), HeaderError> {
    const NAMES: [&str; 5] = [
        "the dirty bit (lazy refcounts were in use and the image was not closed cleanly; repair it with `qemu-img check -r all`)",
        "the corrupt bit (QEMU found the metadata inconsistent; repair it with `qemu-img check -r all`)",
        "an external data file",
        "a compression type other than zlib",
        "extended L2 entries (subclusters)",
    ];
    if bits == 0 {
        return Ok(());
    }
    let bit = bits.trailing_zeros();
    let name = NAMES
        .get(bit as usize)
        .map(|s| (*s).to_string())
        .unwrap_or_else(|| format!("incompatible feature bit {bit}"));
    Err(HeaderError::Unsupported(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn v3_header(cluster_bits: u32, crypt: u32, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 1 << cluster_bits];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[32..36].copy_from_slice(&crypt.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        read(&f)
    }

    #[test]
    fn refusals_name_the_feature() {
        assert!(parse(&v3_header(16, 0, 0)).is_ok());
        let e = parse(&v3_header(16, 1, 0)).unwrap_err();
        assert_eq!(e, HeaderError::Unsupported("encryption (AES)".into()));
        let e = parse(&v3_header(16, 0, 1 << 2)).unwrap_err();
        assert_eq!(e, HeaderError::Unsupported("an external data file".into()));
        let e = parse(&v3_header(16, 0, 1 << 4)).unwrap_err();
        assert!(matches!(e, HeaderError::Unsupported(m) if m.contains("subclusters")));
        let e = parse(&v3_header(16, 0, 1 << 40)).unwrap_err();
        assert!(matches!(e, HeaderError::Unsupported(m) if m.contains("bit 40")));
        let e = parse(&v3_header(30, 0, 0)).unwrap_err();
        assert!(matches!(e, HeaderError::Invalid(_)));
        assert!(matches!(
            parse(b"not a qcow2 image, just some bytes that are long enough for a header......"),
            Err(HeaderError::Invalid(_))
        ));
    }

    #[test]
    fn hostile_extension_lengths_are_refused() {
        let mut h = v3_header(9, 0, 0);
        // An extension whose length runs past the cluster.
        h[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&h), Err(HeaderError::Invalid(_))));
        // A backing name outside the first cluster.
        let mut h = v3_header(9, 0, 0);
        h[8..16].copy_from_slice(&500u64.to_be_bytes());
        h[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(matches!(parse(&h), Err(HeaderError::Invalid(_))));
    }
}
