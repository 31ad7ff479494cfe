//! Before a writable image is handed to imago: do its refcounts account for its own
//! metadata?
//!
//! imago allocates a cluster wherever the refcount blocks say it is free. In an image
//! whose refcounts miss its own metadata (the header, the refcount table, the L1 table,
//! an L2 table or a refcount block counted as free), the first allocating write lands on
//! that metadata: the refcount block imago creates to cover cluster 0 overwrites the
//! header, guest data overwrites a table, and imago's allocator can recurse without end
//! (found by the `qcow2` fuzz target: a stack overflow on the worker thread). QEMU
//! refuses such writes with its metadata-overlap checks and marks the image corrupt;
//! xenblkd refuses to open the image writable and names the repair.
//!
//! Checked: every cluster of the header, refcount table, L1 table, every L2 table and
//! every refcount block has a non-zero refcount. Reads are bounded by QEMU's own limits
//! on the two top-level tables (8 MiB of refcount table, 32 MiB of L1 table) plus one
//! cluster per L2 table and refcount block, each read once.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::header::{Header, HeaderError};

/// QEMU's `QCOW_MAX_REFTABLE_SIZE`.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_L1_SIZE`.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Host offset bits of L1, L2-pointer and refcount table entries (qcow2.txt).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Reads `len` bytes at `offset` through a page-aligned buffer (the file may be open with
/// O_DIRECT); bytes past the end of the file read as zeros, as imago reads them.
fn read_range(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let start = offset & !4095;
    // Below 4096: cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    let skip = (offset - start) as usize;
    let mut buf = crate::AlignedBuf::page_aligned((skip + len).next_multiple_of(4096));
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf.as_mut_slice()[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.as_mut_slice()[got..].fill(0);
    Ok(buf.as_slice()[skip..skip + len].to_vec())
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn invalid(what: impl std::fmt::Display) -> HeaderError {
    HeaderError::Invalid(format!(
        "{what}; repair the image with `qemu-img check -r all`"
    ))
}

struct Refcounts<'a> {
    file: &'a File,
    cluster_bits: u32,
    refcount_bits: u32,
    reftable: Vec<u64>,
    blocks: HashMap<u64, Vec<u8>>,
}

impl Refcounts<'_> {
    fn io(e: std::io::Error) -> HeaderError {
        HeaderError::Invalid(format!("reading the refcounts: {e}"))
    }

    /// The refcount of host cluster `cluster` (0 when no refcount block covers it).
    fn of(&mut self, cluster: u64) -> Result<u64, HeaderError> {
        let per_block_bits = self.cluster_bits + 3 - self.refcount_bits.trailing_zeros();
        let Some(&entry) = usize::try_from(cluster >> per_block_bits)
            .ok()
            .and_then(|i| self.reftable.get(i))
        else {
            return Ok(0);
        };
        let block = entry & OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if !self.blocks.contains_key(&block) {
            let bytes = read_range(self.file, block, 1 << self.cluster_bits).map_err(Self::io)?;
            self.blocks.insert(block, bytes);
        }
        let bytes = &self.blocks[&block];
        let index = cluster & ((1u64 << per_block_bits) - 1);
        let bit = index * u64::from(self.refcount_bits);
        let at = (bit / 8) as usize;
        Ok(match self.refcount_bits {
            // Sub-byte widths: bit 0 is the least significant bit of the byte.
            1 | 2 | 4 => u64::from(bytes[at] >> (bit % 8)) & ((1u64 << self.refcount_bits) - 1),
            w => bytes[at..at + (w / 8) as usize]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        })
    }

    /// Every cluster of `[offset, offset + len)` must be counted.
    fn require(&mut self, offset: u64, len: u64, what: &str) -> Result<(), HeaderError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            if self.of(cluster)? == 0 {
                return Err(invalid(format_args!(
                    "the refcounts count {what} (cluster {cluster}) as free"
                )));
            }
        }
        Ok(())
    }
}

/// Checks that the refcounts of the image open as `file` account for its own metadata.
pub(crate) fn check(file: &File, h: &Header) -> Result<(), HeaderError> {
    let cluster_size = h.cluster_size();
    if h.refcount_order > 6 {
        return Err(HeaderError::Invalid(format!(
            "refcount_order {} out of range 0..=6",
            h.refcount_order
        )));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
    if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
        return Err(HeaderError::Invalid(format!(
            "refcount table of {} clusters",
            h.refcount_table_clusters
        )));
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(HeaderError::Invalid(format!(
            "L1 table of {} entries",
            h.l1_size
        )));
    }
    let aligned = |o: u64| o.is_multiple_of(cluster_size) && o.checked_add(cluster_size).is_some();
    if !aligned(h.refcount_table_offset) || h.refcount_table_offset == 0 {
        return Err(HeaderError::Invalid("unaligned refcount table".into()));
    }
    if l1_bytes > 0 && (!aligned(h.l1_table_offset) || h.l1_table_offset == 0) {
        return Err(HeaderError::Invalid("unaligned L1 table".into()));
    }
    let io = Refcounts::io;
    // Both at most 32 MiB (checked above).
    let too_big = |_| HeaderError::Invalid("metadata table too large".into());
    let (rt_len, l1_len) = (
        usize::try_from(rt_bytes).map_err(too_big)?,
        usize::try_from(l1_bytes).map_err(too_big)?,
    );
    let rt = read_range(file, h.refcount_table_offset, rt_len).map_err(io)?;
    let mut refs = Refcounts {
        file,
        cluster_bits: h.cluster_bits,
        refcount_bits: 1 << h.refcount_order,
        reftable: rt.chunks_exact(8).map(|e| be64(e, 0)).collect(),
        blocks: HashMap::new(),
    };
    refs.require(0, cluster_size, "the header")?;
    refs.require(h.refcount_table_offset, rt_bytes, "the refcount table")?;
    refs.require(h.l1_table_offset, l1_bytes, "the L1 table")?;
    let blocks: Vec<u64> = refs
        .reftable
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    for block in blocks {
        refs.require(block, cluster_size, "a refcount block")?;
    }
    let l1 = read_range(file, h.l1_table_offset, l1_len).map_err(io)?;
    for entry in l1.chunks_exact(8) {
        let l2 = be64(entry, 0) & OFFSET_MASK;
        if l2 != 0 {
            refs.require(l2, cluster_size, "an L2 table")?;
        }
    }
    Ok(())
}
