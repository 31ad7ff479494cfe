//! Transactions: isolation, commit, abort, conflicts, the retry helper under
//! real concurrency, and a client that disconnects mid-transaction.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::Harness;
use xenstore::wire::MsgType;
use xenstore::{ClientConfig, Errno, Error, XsOps};

#[test]
fn commit_is_atomic_and_isolated() {
    let h = Harness::new();
    let xs = h.client(0);
    let other = h.client(0);
    xs.write("/cfg/old", "1").unwrap();

    let tx = xs.transaction_start().unwrap();
    assert_ne!(tx.id(), 0);
    tx.write("/cfg/a", "1").unwrap();
    tx.write("/cfg/b/c", "2").unwrap();
    tx.rm("/cfg/old").unwrap();
    // The transaction sees its own changes...
    assert_eq!(tx.read("/cfg/b/c").unwrap(), b"2");
    assert!(tx.read("/cfg/old").unwrap_err().is_not_found());
    let mut names = tx.directory("/cfg").unwrap();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    // ...nobody else does yet.
    assert!(other.read("/cfg/a").unwrap_err().is_not_found());
    assert_eq!(other.read("/cfg/old").unwrap(), b"1");
    tx.commit().unwrap();

    assert_eq!(other.read("/cfg/a").unwrap(), b"1");
    assert_eq!(other.read("/cfg/b/c").unwrap(), b"2");
    assert!(other.read("/cfg/old").unwrap_err().is_not_found());
}

#[test]
fn abort_and_drop_discard() {
    let h = Harness::new();
    let xs = h.client(0);
    let tx = xs.transaction_start().unwrap();
    tx.write("/gone", "1").unwrap();
    tx.abort().unwrap();
    assert!(xs.read("/gone").unwrap_err().is_not_found());

    {
        let tx = xs.transaction_start().unwrap();
        tx.write("/gone", "1").unwrap();
        // Dropped without commit: aborted.
    }
    assert!(xs.read("/gone").unwrap_err().is_not_found());
    assert_eq!(h.server.connection_stats()[0].transactions, 0);

    // A failing closure aborts too, and its error comes back.
    let r: Result<(), Error> = xs.transaction(|tx| {
        tx.write("/gone", "1")?;
        tx.read("/nope").map(drop)
    });
    assert!(r.unwrap_err().is_not_found());
    assert!(xs.read("/gone").unwrap_err().is_not_found());
}

#[test]
fn conflicting_write_gives_eagain() {
    let h = Harness::new();
    let xs = h.client(0);
    let other = h.client(0);
    xs.write("/k", "0").unwrap();
    xs.write("/unrelated", "0").unwrap();

    // A node read in the transaction changes: conflict.
    let tx = xs.transaction_start().unwrap();
    tx.read("/k").unwrap();
    tx.write("/out", "x").unwrap();
    other.write("/k", "1").unwrap();
    assert!(matches!(tx.commit(), Err(Error::Xs(Errno::Eagain))));
    assert!(
        xs.read("/out").unwrap_err().is_not_found(),
        "a failed commit changes nothing"
    );

    // A node written in the transaction changes: conflict.
    let tx = xs.transaction_start().unwrap();
    tx.write("/k", "tx").unwrap();
    other.write("/k", "2").unwrap();
    assert!(tx.commit().unwrap_err().is_again());
    assert_eq!(xs.read("/k").unwrap(), b"2");

    // A node that was missing gets created: conflict.
    let tx = xs.transaction_start().unwrap();
    assert!(tx.read("/k/new").unwrap_err().is_not_found());
    other.write("/k/new", "1").unwrap();
    assert!(tx.commit().unwrap_err().is_again());

    // Changes elsewhere do not conflict.
    let tx = xs.transaction_start().unwrap();
    tx.read("/k").unwrap();
    tx.write("/k", "3").unwrap();
    other.write("/unrelated", "1").unwrap();
    tx.commit().unwrap();
    assert_eq!(xs.read("/k").unwrap(), b"3");
}

#[test]
fn transaction_protocol_errors() {
    let h = Harness::new();
    let xs = h.client(0);
    let other = h.client(0);
    let tx = xs.transaction_start().unwrap();
    // Nested start.
    assert!(matches!(
        tx.raw_request(MsgType::TransactionStart, b"\0"),
        Err(Error::Xs(Errno::Ebusy))
    ));
    // Bad end flag.
    assert!(matches!(
        tx.raw_request(MsgType::TransactionEnd, b"X\0"),
        Err(Error::Xs(Errno::Einval))
    ));
    // Unknown transaction id.
    assert!(matches!(
        xs.raw_request(MsgType::TransactionEnd, b"T\0"),
        Err(Error::Xs(Errno::Enoent))
    ));
    // Another connection cannot use this transaction's id.
    let mut raw = h.raw(0);
    common::send_raw(&mut raw, MsgType::Write.as_u32(), 1, tx.id(), b"/stolen\0x");
    let reply = common::recv_raw(&mut raw);
    assert_eq!(common::error_name(&reply).as_deref(), Some("ENOENT"));
    assert_eq!(reply.header.req_id, 1);
    tx.commit().unwrap();
    assert!(other.read("/stolen").unwrap_err().is_not_found());
    // A finished transaction's id is no longer valid.
    common::send_raw(&mut raw, MsgType::Read.as_u32(), 2, 12345, b"/\0");
    assert_eq!(
        common::error_name(&common::recv_raw(&mut raw)).as_deref(),
        Some("ENOENT")
    );
}

#[test]
fn retry_helper_recovers_from_a_conflict() {
    let h = Harness::new();
    let xs = h.client(0);
    let intruder = h.client(0);
    xs.write("/counter", "0").unwrap();
    let attempts = AtomicU32::new(0);
    let result = xs
        .transaction(|tx| {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            let v: u32 = tx.read_string("/counter")?.parse().unwrap();
            if n == 0 {
                // Someone else commits in between, exactly once.
                intruder.write("/counter", "100").unwrap();
            }
            tx.write("/counter", (v + 1).to_string())?;
            Ok(v + 1)
        })
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(result, 101);
    assert_eq!(xs.read_string("/counter").unwrap(), "101");
}

#[test]
fn retry_helper_gives_up_after_the_bound() {
    let h = Harness::new();
    let config = ClientConfig {
        transaction_retries: 3,
        ..Harness::config()
    };
    let xs = h.client_with(0, config);
    let intruder = h.client(0);
    xs.write("/hot", "0").unwrap();
    let attempts = AtomicU32::new(0);
    let r: Result<(), Error> = xs.transaction(|tx| {
        attempts.fetch_add(1, Ordering::SeqCst);
        tx.read("/hot")?;
        intruder.write("/hot", "x").unwrap();
        tx.write("/hot", "mine")
    });
    assert!(r.unwrap_err().is_again());
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
}

#[test]
fn concurrent_increments_are_not_lost() {
    let h = Arc::new(Harness::new());
    h.client(0).write("/ctr", "0").unwrap();
    const THREADS: u32 = 3;
    const EACH: u32 = 60;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                // Generous bound: under contention a transaction can lose
                // many races in a row; the bound is only a failure guard.
                let xs = h.client_with(
                    0,
                    ClientConfig {
                        transaction_retries: 100_000,
                        ..Harness::config()
                    },
                );
                for _ in 0..EACH {
                    xs.transaction(|tx| {
                        let v: u32 = tx.read_string("/ctr")?.parse().unwrap();
                        tx.write("/ctr", (v + 1).to_string())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        h.client(0).read_string("/ctr").unwrap(),
        (THREADS * EACH).to_string()
    );
}

#[test]
fn guest_transactions_respect_permissions_and_quota() {
    let h = Harness::with_config(xenstore::ServerConfig {
        max_nodes_per_domain: 5,
        ..Default::default()
    });
    let dom0 = h.client(0);
    let home = h.make_home(&dom0, 5);
    let guest = h.client(5);
    let r = guest.transaction(|tx| tx.write("/top", "x"));
    assert!(matches!(r, Err(Error::Xs(Errno::Eacces))));
    // The home counts as one node of dom5's five.
    let r = guest.transaction(|tx| {
        for i in 0..5 {
            tx.write(&format!("n{i}"), "x")?;
        }
        Ok(())
    });
    assert!(matches!(r, Err(Error::Xs(Errno::Equota))));
    assert!(dom0.directory(&home).unwrap().is_empty());
    guest
        .transaction(|tx| {
            for i in 0..4 {
                tx.write(&format!("n{i}"), "x")?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(dom0.directory(&home).unwrap().len(), 4);
}

#[test]
fn disconnect_mid_transaction_discards_it() {
    let h = Harness::new();
    let observer = h.client(0);
    {
        let xs = h.client(0);
        xs.watch("/w", "t").unwrap();
        let tx = xs.transaction_start().unwrap();
        tx.write("/half/done", "1").unwrap();
        // The client goes away with the transaction open (forget() skips
        // the abort a dropped Transaction would send).
        std::mem::forget(tx);
        let stats = h.server.connection_stats();
        assert_eq!(stats.iter().map(|s| s.transactions).sum::<usize>(), 1);
        assert_eq!(stats.iter().map(|s| s.watches).sum::<usize>(), 1);
    }
    h.eventually("disconnected client cleaned up", || {
        h.server.connection_stats().len() == 1
    });
    let stats = h.server.connection_stats();
    assert_eq!(stats[0].transactions, 0);
    assert_eq!(stats[0].watches, 0);
    assert!(observer.read("/half/done").unwrap_err().is_not_found());
    assert!(observer.read("/half").unwrap_err().is_not_found());
}

#[test]
fn transaction_quota_per_connection() {
    let h = Harness::with_config(xenstore::ServerConfig {
        max_transactions_per_connection: 2,
        ..Default::default()
    });
    let guest = h.client(5);
    let a = guest.transaction_start().unwrap();
    let b = guest.transaction_start().unwrap();
    assert!(matches!(
        guest.transaction_start(),
        Err(Error::Xs(Errno::Enospc))
    ));
    a.abort().unwrap();
    let c = guest.transaction_start().unwrap();
    drop((b, c));
    // dom0 is exempt.
    let dom0 = h.client(0);
    let txs: Vec<_> = (0..5).map(|_| dom0.transaction_start().unwrap()).collect();
    drop(txs);
}
