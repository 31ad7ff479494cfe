//! One test per validation rule of Linux blkback (`dispatch_rw_block_io`,
//! `xen_blkbk_parse_indirect`, `dispatch_discard_io`, `dispatch_other_io`,
//! `xen_vbd_translate`), each asserting the exact [`RequestError`] variant and the
//! response status it maps to.

use blkif::abi::{
    BLKIF_DISCARD_SECURE, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_RESERVED_1, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, PAGE_SIZE,
};
use blkif::{
    DeviceLimits, IndirectRequest, Operation, Protocol, RawRequest, Request, RequestError, Segment,
    Segments, Validated,
};

const ALL_PROTOCOLS: [Protocol; 3] = [Protocol::Native, Protocol::X86_32, Protocol::X86_64];

fn limits() -> DeviceLimits {
    DeviceLimits {
        sectors: 1 << 21,
        read_only: false,
        logical_block_size: 512,
        max_indirect_segments: 256,
        discard: true,
        secure_discard: true,
        flush: true,
        barrier: true,
    }
}

fn full_page(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

fn direct(op: u8, sector: u64, segs: &[Segment]) -> RawRequest {
    RawRequest::direct(op, 0xfeed, 3, sector, segs).unwrap()
}

/// Validates after a round trip through every ABI's slot bytes (so each rule is
/// exercised on decoded copies), checking all three agree, and returns the result.
fn check(raw: RawRequest, limits: &DeviceLimits) -> Result<Validated, RequestError> {
    let mut results = ALL_PROTOCOLS.iter().map(|&p| {
        let decoded = RawRequest::decode(p, &raw.encode(p));
        assert_eq!(decoded, raw, "{p:?} round trip");
        decoded.validate(limits)
    });
    let first = results.next().unwrap();
    for r in results {
        assert_eq!(r, first);
    }
    first
}

fn refused(raw: RawRequest, limits: &DeviceLimits) -> RequestError {
    match check(raw, limits) {
        Err(e) => {
            // Every refusal can be answered with the request's own id.
            let rsp = raw.response(e.status());
            assert_eq!(rsp.id, raw.id());
            assert_eq!(rsp.operation, raw.response_operation());
            e
        }
        Ok(v) => panic!("accepted {raw:?} as {v:?}"),
    }
}

fn ready(raw: RawRequest, limits: &DeviceLimits) -> Request {
    match check(raw, limits) {
        Ok(Validated::Ready(r)) => r,
        other => panic!("{raw:?}: {other:?}"),
    }
}

fn indirect_header(raw: RawRequest, limits: &DeviceLimits) -> IndirectRequest {
    match check(raw, limits) {
        Ok(Validated::Indirect(i)) => i,
        other => panic!("{raw:?}: {other:?}"),
    }
}

/// Descriptor pages (private copies) holding `segs`.
fn pages(segs: &[Segment]) -> Vec<Vec<u8>> {
    segs.chunks(512)
        .map(|chunk| {
            let mut page = vec![0u8; PAGE_SIZE];
            for (d, s) in page.chunks_exact_mut(8).zip(chunk) {
                d.copy_from_slice(&s.encode());
            }
            page
        })
        .collect()
}

fn indirect(op: u8, sector: u64, nr_segments: u16) -> RawRequest {
    RawRequest::indirect(
        op,
        0xabcd,
        5,
        sector,
        nr_segments,
        &[10, 11, 12, 13, 14, 15, 16, 17],
    )
    .unwrap()
}

fn run_indirect(
    raw: RawRequest,
    segs: &[Segment],
    limits: &DeviceLimits,
) -> Result<Request, RequestError> {
    let header = indirect_header(raw, limits);
    let pages = pages(segs);
    let mut buf = vec![Segment::default(); 4096];
    let parsed = header.parse_segments(&pages, &mut buf)?;
    assert_eq!(parsed, segs);
    header.finish(parsed, limits)
}

// ---- opcodes ----------------------------------------------------------------------------

#[test]
fn unknown_opcode_is_eopnotsupp() {
    for op in [7u8, 8, 100, 255] {
        let e = refused(
            RawRequest::Other {
                operation: op,
                id: 9,
            },
            &limits(),
        );
        assert_eq!(e, RequestError::UnsupportedOperation(op));
        assert_eq!(e.status(), BLKIF_RSP_EOPNOTSUPP);
    }
}

#[test]
fn reserved_1_is_eopnotsupp() {
    let raw = RawRequest::Other {
        operation: BLKIF_OP_RESERVED_1,
        id: 9,
    };
    let e = refused(raw, &limits());
    assert_eq!(e, RequestError::UnsupportedOperation(BLKIF_OP_RESERVED_1));
    assert_eq!(e.status(), BLKIF_RSP_EOPNOTSUPP);
    assert_eq!(raw.response(e.status()).operation, BLKIF_OP_RESERVED_1);
}

#[test]
fn indirect_inner_op_must_be_read_or_write() {
    for inner in [
        BLKIF_OP_WRITE_BARRIER,
        BLKIF_OP_FLUSH_DISKCACHE,
        BLKIF_OP_DISCARD,
        BLKIF_OP_INDIRECT,
        77,
    ] {
        let raw = indirect(inner, 0, 1);
        let e = refused(raw, &limits());
        assert_eq!(e, RequestError::InvalidIndirectOperation(inner));
        assert_eq!(e.status(), BLKIF_RSP_ERROR);
        // blkback answers with the inner op (`req_operation`), not BLKIF_OP_INDIRECT.
        assert_eq!(raw.response(e.status()).operation, inner);
    }
}

// ---- segment counts ---------------------------------------------------------------------

#[test]
fn zero_segments_refused_for_read_and_write() {
    for op in [BLKIF_OP_READ, BLKIF_OP_WRITE] {
        assert_eq!(
            refused(direct(op, 0, &[]), &limits()),
            RequestError::NoSegments { operation: op }
        );
    }
}

#[test]
fn zero_segments_allowed_for_flush_and_barrier() {
    let r = ready(direct(BLKIF_OP_FLUSH_DISKCACHE, 12345, &[]), &limits());
    assert_eq!(r.operation, Operation::Flush);
    assert_eq!((r.nr_sectors, r.segments), (0, Segments::None));
    let r = ready(direct(BLKIF_OP_WRITE_BARRIER, u64::MAX, &[]), &limits());
    assert_eq!(r.operation, Operation::Barrier);
    assert_eq!(r.response(0).operation, BLKIF_OP_WRITE_BARRIER);
}

#[test]
fn flush_with_data_carries_its_segments() {
    let r = ready(
        direct(BLKIF_OP_FLUSH_DISKCACHE, 8, &[full_page(1), full_page(2)]),
        &limits(),
    );
    assert_eq!(r.nr_sectors, 16);
    match r.segments {
        Segments::Direct(s) => assert_eq!(s.as_slice(), &[full_page(1), full_page(2)]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_segments_refused_for_indirect() {
    assert_eq!(
        refused(indirect(BLKIF_OP_READ, 0, 0), &limits()),
        RequestError::NoSegments {
            operation: BLKIF_OP_INDIRECT
        }
    );
}

#[test]
fn more_than_11_direct_segments_refused() {
    let ok = ready(direct(BLKIF_OP_READ, 0, &[full_page(1); 11]), &limits());
    assert_eq!(ok.nr_sectors, 88);
    for n in [12u8, 100, 255] {
        let RawRequest::ReadWrite { segments, .. } = direct(BLKIF_OP_WRITE, 0, &[full_page(1); 11])
        else {
            unreachable!()
        };
        let raw = RawRequest::ReadWrite {
            operation: BLKIF_OP_WRITE,
            nr_segments: n,
            handle: 0,
            id: 1,
            sector_number: 0,
            segments,
        };
        assert_eq!(
            refused(raw, &limits()),
            RequestError::TooManySegments { nr_segments: n }
        );
    }
}

#[test]
fn more_indirect_segments_than_advertised_refused() {
    let l = limits();
    indirect_header(indirect(BLKIF_OP_READ, 0, 256), &l);
    assert_eq!(
        refused(indirect(BLKIF_OP_READ, 0, 257), &l),
        RequestError::TooManyIndirectSegments {
            nr_segments: 257,
            max: 256
        }
    );
    let no_indirect = DeviceLimits {
        max_indirect_segments: 0,
        ..l
    };
    assert_eq!(
        refused(indirect(BLKIF_OP_WRITE, 0, 1), &no_indirect),
        RequestError::TooManyIndirectSegments {
            nr_segments: 1,
            max: 0
        }
    );
}

#[test]
fn more_than_8_indirect_pages_refused() {
    // Only reachable when the advertised maximum exceeds 8 * 512 (blkback BUG_ON()s).
    let l = DeviceLimits {
        max_indirect_segments: 65535,
        ..limits()
    };
    assert_eq!(
        indirect_header(indirect(BLKIF_OP_READ, 0, 4096), &l).nr_pages(),
        8
    );
    assert_eq!(
        refused(indirect(BLKIF_OP_READ, 0, 4097), &l),
        RequestError::TooManyIndirectPages { nr_pages: 9 }
    );
}

// ---- first/last sector ------------------------------------------------------------------

#[test]
fn last_sect_outside_page_refused() {
    for last in [8u8, 9, 255] {
        let segs = [
            full_page(1),
            Segment {
                gref: 2,
                first_sect: 0,
                last_sect: last,
            },
        ];
        assert_eq!(
            refused(direct(BLKIF_OP_READ, 0, &segs), &limits()),
            RequestError::LastSectorOutsidePage {
                index: 1,
                last_sect: last
            }
        );
    }
}

#[test]
fn last_sect_before_first_refused() {
    let segs = [Segment {
        gref: 2,
        first_sect: 5,
        last_sect: 4,
    }];
    assert_eq!(
        refused(direct(BLKIF_OP_WRITE, 0, &segs), &limits()),
        RequestError::LastSectorBeforeFirst {
            index: 0,
            first_sect: 5,
            last_sect: 4
        }
    );
}

#[test]
fn partial_pages_are_fine_with_512_byte_blocks() {
    let segs = [
        Segment {
            gref: 1,
            first_sect: 3,
            last_sect: 3,
        },
        Segment {
            gref: 2,
            first_sect: 0,
            last_sect: 6,
        },
    ];
    let r = ready(direct(BLKIF_OP_READ, 7, &segs), &limits());
    assert_eq!((r.sector, r.nr_sectors), (7, 8));
}

#[test]
fn indirect_descriptor_last_sect_outside_page_refused() {
    let l = DeviceLimits {
        max_indirect_segments: 1024,
        ..limits()
    };
    let mut segs = vec![full_page(3); 700];
    segs[600].last_sect = 8; // on the second descriptor page
    assert_eq!(
        run_indirect(indirect(BLKIF_OP_READ, 0, 700), &segs, &l),
        Err(RequestError::LastSectorOutsidePage {
            index: 600,
            last_sect: 8
        })
    );
}

#[test]
fn indirect_descriptor_last_before_first_refused() {
    let mut segs = vec![full_page(3); 10];
    segs[9] = Segment {
        gref: 1,
        first_sect: 7,
        last_sect: 0,
    };
    assert_eq!(
        run_indirect(indirect(BLKIF_OP_WRITE, 0, 10), &segs, &limits()),
        Err(RequestError::LastSectorBeforeFirst {
            index: 9,
            first_sect: 7,
            last_sect: 0
        })
    );
}

#[test]
fn indirect_request_accepted_across_pages() {
    let l = DeviceLimits {
        max_indirect_segments: 4096,
        ..limits()
    };
    let segs: Vec<Segment> = (0..1500u32).map(full_page).collect();
    let r = run_indirect(indirect(BLKIF_OP_WRITE, 64, 1500), &segs, &l).unwrap();
    assert_eq!(r.operation, Operation::Write);
    assert_eq!((r.sector, r.nr_sectors), (64, 12000));
    assert_eq!(r.segments, Segments::Indirect { count: 1500 });
    assert_eq!(r.response(0).operation, BLKIF_OP_WRITE);
}

// ---- ranges (xen_vbd_translate) ---------------------------------------------------------

#[test]
fn sector_range_overflowing_u64_refused() {
    let sector = u64::MAX - 3;
    assert_eq!(
        refused(direct(BLKIF_OP_READ, sector, &[full_page(1)]), &limits()),
        RequestError::SectorOverflow {
            sector,
            nr_sectors: 8
        }
    );
    let raw = RawRequest::discard(1, 0, 8, u64::MAX, false);
    assert_eq!(
        refused(raw, &limits()),
        RequestError::SectorOverflow {
            sector: 8,
            nr_sectors: u64::MAX
        }
    );
}

#[test]
fn sector_range_past_the_disk_refused() {
    let l = limits();
    let last_page = l.sectors - 8;
    ready(direct(BLKIF_OP_WRITE, last_page, &[full_page(1)]), &l);
    assert_eq!(
        refused(direct(BLKIF_OP_WRITE, last_page + 1, &[full_page(1)]), &l),
        RequestError::BeyondEnd {
            sector: last_page + 1,
            nr_sectors: 8,
            capacity: l.sectors
        }
    );
    assert_eq!(
        refused(RawRequest::discard(1, 0, l.sectors, 1, false), &l),
        RequestError::BeyondEnd {
            sector: l.sectors,
            nr_sectors: 1,
            capacity: l.sectors
        }
    );
}

#[test]
fn indirect_range_past_the_disk_refused_in_finish() {
    let l = DeviceLimits {
        sectors: 1000,
        ..limits()
    };
    let segs = vec![full_page(1); 2];
    assert_eq!(
        run_indirect(indirect(BLKIF_OP_READ, 990, 2), &segs, &l),
        Err(RequestError::BeyondEnd {
            sector: 990,
            nr_sectors: 16,
            capacity: 1000
        })
    );
}

#[test]
fn empty_discard_is_accepted_anywhere() {
    // xen_vbd_translate checks the range only when nr_sects != 0.
    let r = ready(RawRequest::discard(1, 0, u64::MAX, 0, false), &limits());
    assert_eq!(r.nr_sectors, 0);
}

// ---- read-only ----------------------------------------------------------------------------

#[test]
fn writes_on_read_only_device_refused() {
    let ro = DeviceLimits {
        read_only: true,
        ..limits()
    };
    ready(direct(BLKIF_OP_READ, 0, &[full_page(1)]), &ro);
    for op in [
        BLKIF_OP_WRITE,
        BLKIF_OP_FLUSH_DISKCACHE,
        BLKIF_OP_WRITE_BARRIER,
    ] {
        let segs: &[Segment] = if op == BLKIF_OP_WRITE {
            &[full_page(1)]
        } else {
            &[]
        };
        assert_eq!(
            refused(direct(op, 0, segs), &ro),
            RequestError::ReadOnly { operation: op }
        );
    }
    assert_eq!(
        refused(RawRequest::discard(1, 0, 0, 8, true), &ro),
        RequestError::ReadOnly {
            operation: BLKIF_OP_DISCARD
        }
    );
    // Indirect writes are refused before any descriptor page is mapped.
    assert_eq!(
        refused(indirect(BLKIF_OP_WRITE, 0, 4), &ro),
        RequestError::ReadOnly {
            operation: BLKIF_OP_WRITE
        }
    );
    indirect_header(indirect(BLKIF_OP_READ, 0, 4), &ro);
}

// ---- alignment ----------------------------------------------------------------------------

fn four_k() -> DeviceLimits {
    DeviceLimits {
        logical_block_size: 4096,
        ..limits()
    }
}

#[test]
fn misaligned_start_refused() {
    ready(direct(BLKIF_OP_READ, 16, &[full_page(1)]), &four_k());
    assert_eq!(
        refused(direct(BLKIF_OP_READ, 17, &[full_page(1)]), &four_k()),
        RequestError::Misaligned {
            sector: 17,
            nr_sectors: 8,
            logical_block_size: 4096
        }
    );
}

#[test]
fn misaligned_segment_length_refused() {
    let half = Segment {
        gref: 1,
        first_sect: 0,
        last_sect: 3,
    };
    assert_eq!(
        refused(direct(BLKIF_OP_WRITE, 8, &[full_page(1), half]), &four_k()),
        RequestError::Misaligned {
            sector: 8,
            nr_sectors: 4,
            logical_block_size: 4096
        }
    );
}

#[test]
fn misaligned_indirect_refused_in_finish() {
    let mut segs = vec![full_page(1); 3];
    segs[2].first_sect = 1;
    assert_eq!(
        run_indirect(indirect(BLKIF_OP_READ, 8, 3), &segs, &four_k()),
        Err(RequestError::Misaligned {
            sector: 8,
            nr_sectors: 7,
            logical_block_size: 4096
        })
    );
}

#[test]
fn misaligned_discard_refused() {
    assert_eq!(
        refused(RawRequest::discard(1, 0, 8, 12, false), &four_k()),
        RequestError::Misaligned {
            sector: 8,
            nr_sectors: 12,
            logical_block_size: 4096
        }
    );
}

// ---- features -----------------------------------------------------------------------------

#[test]
fn discard_without_feature_is_eopnotsupp() {
    let l = DeviceLimits {
        discard: false,
        ..limits()
    };
    let e = refused(RawRequest::discard(1, 0, 0, 8, false), &l);
    assert_eq!(e, RequestError::DiscardNotSupported);
    assert_eq!(e.status(), BLKIF_RSP_EOPNOTSUPP);
}

#[test]
fn flush_and_barrier_without_feature_are_eopnotsupp() {
    let l = DeviceLimits {
        flush: false,
        barrier: false,
        ..limits()
    };
    let e = refused(direct(BLKIF_OP_FLUSH_DISKCACHE, 0, &[]), &l);
    assert_eq!(
        (e, e.status()),
        (RequestError::FlushNotSupported, BLKIF_RSP_EOPNOTSUPP)
    );
    let e = refused(direct(BLKIF_OP_WRITE_BARRIER, 0, &[]), &l);
    assert_eq!(
        (e, e.status()),
        (RequestError::BarrierNotSupported, BLKIF_RSP_EOPNOTSUPP)
    );
}

#[test]
fn secure_discard_only_when_advertised() {
    let raw = RawRequest::discard(1, 0, 0, 8, true);
    assert!(matches!(raw, RawRequest::Discard { flag, .. } if flag == BLKIF_DISCARD_SECURE));
    assert_eq!(
        ready(raw, &limits()).operation,
        Operation::Discard { secure: true }
    );
    let l = DeviceLimits {
        secure_discard: false,
        ..limits()
    };
    // blkif.h: the flag is ignored when discard-secure was not advertised.
    assert_eq!(
        ready(raw, &l).operation,
        Operation::Discard { secure: false }
    );
    assert_eq!(
        ready(RawRequest::discard(1, 0, 0, 8, false), &limits()).operation,
        Operation::Discard { secure: false }
    );
}

// ---- engine misuse of the indirect API ----------------------------------------------------

#[test]
fn indirect_parse_reports_engine_errors() {
    let header = indirect_header(
        indirect(BLKIF_OP_READ, 0, 600),
        &DeviceLimits {
            max_indirect_segments: 1024,
            ..limits()
        },
    );
    assert_eq!(header.indirect_grefs(), &[10, 11]);
    let segs = vec![full_page(1); 600];
    let good = pages(&segs);
    let mut buf = vec![Segment::default(); 1024];
    assert_eq!(
        header.parse_segments(&good[..1], &mut buf),
        Err(RequestError::IndirectPagesMissing {
            needed: 2,
            given: 1
        })
    );
    assert_eq!(
        header.parse_segments(&good, &mut buf[..599]),
        Err(RequestError::SegmentBufferTooSmall {
            needed: 600,
            capacity: 599
        })
    );
    let short = vec![good[0].clone(), vec![0u8; 100]];
    assert!(matches!(
        header.parse_segments(&short, &mut buf),
        Err(RequestError::IndirectPageUnreadable { page: 1, .. })
    ));
    assert_eq!(
        header.finish(&segs[..599], &limits()),
        Err(RequestError::SegmentCountMismatch {
            expected: 600,
            given: 599
        })
    );
    // `finish` re-checks descriptors it did not parse itself.
    let mut bad = segs.clone();
    bad[3].last_sect = 9;
    assert_eq!(
        header.finish(&bad, &limits()),
        Err(RequestError::LastSectorOutsidePage {
            index: 3,
            last_sect: 9
        })
    );
}

#[test]
fn descriptors_are_read_from_shared_pages() {
    let page = shmem::SharedMemory::anonymous(PAGE_SIZE).unwrap();
    let segs: Vec<Segment> = (0..5).map(full_page).collect();
    blkif::write_indirect_page(&page, &segs).unwrap();
    let header = indirect_header(indirect(BLKIF_OP_READ, 0, 5), &limits());
    let mut buf = [Segment::default(); 8];
    let parsed = header.parse_segments(&[&page], &mut buf).unwrap();
    assert_eq!(parsed, segs.as_slice());
}

#[test]
fn every_error_status_is_error_or_eopnotsupp() {
    use RequestError::*;
    let not_supported = [
        UnsupportedOperation(9),
        DiscardNotSupported,
        FlushNotSupported,
        BarrierNotSupported,
    ];
    for e in not_supported {
        assert_eq!(e.status(), BLKIF_RSP_EOPNOTSUPP, "{e}");
    }
    let errors = [
        InvalidIndirectOperation(3),
        NoSegments { operation: 0 },
        TooManySegments { nr_segments: 12 },
        TooManyIndirectSegments {
            nr_segments: 1,
            max: 0,
        },
        TooManyIndirectPages { nr_pages: 9 },
        LastSectorOutsidePage {
            index: 0,
            last_sect: 8,
        },
        ReadOnly { operation: 1 },
        SectorOverflow {
            sector: 1,
            nr_sectors: 1,
        },
    ];
    for e in errors {
        assert_eq!(e.status(), BLKIF_RSP_ERROR, "{e}");
    }
}
