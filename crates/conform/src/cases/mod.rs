//! The catalogue: every case, named `<group>.<case>`, with the source of what it expects.
//!
//! Sources are cited as `blkif.h` (Xen's `xen/include/public/io/blkif.h`), `ring.h`,
//! `blkback <function>` (Linux 6.1's `drivers/block/xen-blkback/{blkback,xenbus}.c`) or
//! an XSA number.

mod hostile;
pub(crate) mod integrity;
mod negotiation;
mod ops;

use blkif::abi::{BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY};
use blkif::{RawRequest, Segment};

use crate::front::{page_segs, pattern, Buf, RawFront, Setup};
use crate::target::DeviceRequest;
use crate::verdict::{CaseResult, Ctx, Verdict};

type RunFn = dyn Fn(&mut Ctx<'_>) -> CaseResult + Send + Sync;

/// One case.
pub struct Case {
    pub name: String,
    pub group: &'static str,
    /// Where the expectation comes from.
    pub source: &'static str,
    pub run: Box<RunFn>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish()
    }
}

pub(crate) fn case(
    group: &'static str,
    name: impl Into<String>,
    source: &'static str,
    run: impl Fn(&mut Ctx<'_>) -> CaseResult + Send + Sync + 'static,
) -> Case {
    Case {
        name: format!("{group}.{}", name.into()),
        group,
        source,
        run: Box::new(run),
    }
}

/// Every case, in order.
pub fn catalogue() -> Vec<Case> {
    let mut v = negotiation::cases();
    v.extend(ops::cases());
    v.extend(hostile::cases());
    v.extend(integrity::cases());
    v
}

// ----- helpers shared by the groups ---------------------------------------------------

/// A device connected as `setup`.
pub(crate) fn connected(
    ctx: &mut Ctx<'_>,
    req: DeviceRequest,
    setup: &Setup,
) -> Result<RawFront, Verdict> {
    let mut f = RawFront::open(ctx, req)?;
    f.connect_ok(setup)?;
    Ok(f)
}

/// A direct request (`None` only for an operation `direct` refuses: a bug in a case).
pub(crate) fn direct(
    op: u8,
    id: u64,
    handle: u16,
    sector: u64,
    segs: &[Segment],
) -> Result<RawRequest, Verdict> {
    RawRequest::direct(op, id, handle, sector, segs)
        .ok_or_else(|| Verdict::fail("case bug: request not encodable"))
}

/// Skips unless `cond`.
pub(crate) fn require(cond: bool, why: impl Into<String>) -> CaseResult {
    if cond {
        Ok(())
    } else {
        Err(Verdict::skip(why))
    }
}

/// Fails unless `cond`.
pub(crate) fn ensure(cond: bool, why: impl Into<String>) -> CaseResult {
    if cond {
        Ok(())
    } else {
        Err(Verdict::fail(why))
    }
}

/// Writes `buf` (filled with `seed`'s pattern) at `sector` on ring `q`, reads it back
/// into zeroed pages and compares.
pub(crate) fn write_read_verify(
    f: &mut RawFront,
    q: usize,
    buf: &Buf,
    sector: u64,
    seed: u64,
) -> CaseResult {
    f.fill(buf, |i| pattern(seed, i as u64))?;
    let segs = page_segs(&buf.grefs);
    let w = direct(BLKIF_OP_WRITE, seed, f.handle, sector, &segs)?;
    f.submit(q, &w)?;
    let r = f.responses(q, 1)?;
    crate::front::check_response(&r[0], &w, BLKIF_RSP_OKAY)?;
    f.fill(buf, |_| vec![0u8; 4096])?;
    let rd = direct(BLKIF_OP_READ, seed + 1, f.handle, sector, &segs)?;
    f.submit(q, &rd)?;
    let r = f.responses(q, 1)?;
    crate::front::check_response(&r[0], &rd, BLKIF_RSP_OKAY)?;
    verify(f, buf, seed)
}

/// Checks each page of `buf` holds `seed`'s pattern.
pub(crate) fn verify(f: &RawFront, buf: &Buf, seed: u64) -> CaseResult {
    let mut back = vec![0u8; 4096];
    for (i, &fr) in buf.frames.iter().enumerate() {
        f.read_page(fr, 0, &mut back)?;
        if back != pattern(seed, i as u64) {
            return Err(Verdict::fail(format!("page {i} read back other data")));
        }
    }
    Ok(())
}

/// The standard check of a connection: one page written and read back on every ring.
pub(crate) fn io_on_every_ring(f: &mut RawFront) -> CaseResult {
    let buf = f.buffer(1, false)?;
    for q in 0..f.rings.len() {
        write_read_verify(f, q, &buf, 64 * q as u64, 0x100 + q as u64 * 2)?;
    }
    Ok(())
}
