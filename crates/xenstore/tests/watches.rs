//! Watch semantics: the initial fire, subtree fires, removal fires, relative
//! paths, unwatch, permission filtering, special domain watches, and what a
//! daemon needs to wait for events (blocking with timeout, pollable fd).
//!
//! "No event" is asserted without sleeping: a sentinel write is made after
//! the action under test, and the next event received must be the sentinel
//! (events for one connection are delivered in order).

mod common;

use std::os::fd::AsRawFd;
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};

use common::{ev, Harness, TIMEOUT};
use xenstore::{WatchEvents, XsClient, XsOps};

fn next(events: &WatchEvents) -> xenstore::WatchEvent {
    events.recv_timeout(TIMEOUT).expect("a watch event")
}

/// Asserts that nothing is queued before the sentinel event.
fn expect_only_sentinel(xs: &XsClient, events: &WatchEvents, sentinel_writer: &XsClient) {
    sentinel_writer.write("/sentinel", "x").unwrap();
    assert_eq!(next(events), ev("/sentinel", "sentinel"));
    let _ = xs;
}

fn with_sentinel(xs: &XsClient) -> WatchEvents {
    let events = xs.watch_events();
    xs.watch("/sentinel", "sentinel").unwrap();
    assert_eq!(next(&events), ev("/sentinel", "sentinel"));
    events
}

#[test]
fn initial_fire_and_subtree() {
    let h = Harness::new();
    let xs = h.client(0);
    let writer = h.client(0);
    let events = with_sentinel(&xs);

    // Fires once on registration, even for a node that does not exist.
    xs.watch("/vm/1", "tok").unwrap();
    assert_eq!(next(&events), ev("/vm/1", "tok"));

    writer.write("/vm/1", "a").unwrap();
    assert_eq!(next(&events), ev("/vm/1", "tok"));
    writer.write("/vm/1/device/vbd/51712/state", "1").unwrap();
    assert_eq!(next(&events), ev("/vm/1/device/vbd/51712/state", "tok"));
    writer.mkdir("/vm/1/new").unwrap();
    assert_eq!(next(&events), ev("/vm/1/new", "tok"));
    writer
        .set_perms("/vm/1", &[xenstore::Perm::new(0, xenstore::Access::Read)])
        .unwrap();
    assert_eq!(next(&events), ev("/vm/1", "tok"));

    // Siblings, the parent, and prefixes that are not path ancestors don't fire.
    writer.write("/vm/2", "x").unwrap();
    writer.write("/vm", "x").unwrap();
    writer.write("/vm/10", "x").unwrap();
    // An existing node re-created by mkdir is not a change.
    writer.mkdir("/vm/1/new").unwrap();
    expect_only_sentinel(&xs, &events, &writer);
}

#[test]
fn removal_fires_ancestors_and_descendants() {
    let h = Harness::new();
    let xs = h.client(0);
    let writer = h.client(0);
    writer.write("/a/b/c/d", "1").unwrap();
    let events = with_sentinel(&xs);
    xs.watch("/a/b/c/d", "deep").unwrap();
    assert_eq!(next(&events), ev("/a/b/c/d", "deep"));
    xs.watch("/a", "top").unwrap();
    assert_eq!(next(&events), ev("/a", "top"));

    writer.rm("/a/b").unwrap();
    let mut got = vec![next(&events), next(&events)];
    got.sort_by(|x, y| x.token.cmp(&y.token));
    // The ancestor watch sees the removed node; the watch below it sees its own path.
    assert_eq!(got, [ev("/a/b/c/d", "deep"), ev("/a/b", "top")]);
    // Removing something already gone changes nothing.
    writer.rm("/a/b").unwrap();
    expect_only_sentinel(&xs, &events, &writer);
}

#[test]
fn relative_watch_paths() {
    let h = Harness::new();
    let dom0 = h.client(0);
    let home = h.make_home(&dom0, 5);
    let guest = h.client(5);
    let events = guest.watch_events();

    guest.watch("device", "dev").unwrap();
    assert_eq!(next(&events), ev("device", "dev"));
    dom0.write(&format!("{home}/device/vbd/51712/state"), "1")
        .unwrap();
    // dom0 wrote with its default perms under the guest home: inherited n5.
    assert_eq!(next(&events), ev("device/vbd/51712/state", "dev"));
    guest.write("device/vbd/51712/state", "3").unwrap();
    assert_eq!(next(&events), ev("device/vbd/51712/state", "dev"));

    // The same node watched absolutely reports absolute paths.
    guest.watch(&format!("{home}/device"), "abs").unwrap();
    assert_eq!(next(&events), ev(&format!("{home}/device"), "abs"));
    guest.write("device/x", "1").unwrap();
    let mut got = vec![next(&events), next(&events)];
    got.sort_by(|x, y| x.token.cmp(&y.token));
    assert_eq!(
        got,
        [
            ev(&format!("{home}/device/x"), "abs"),
            ev("device/x", "dev")
        ]
    );

    // Unwatch takes the path as it was registered.
    guest.unwatch("device", "dev").unwrap();
    guest.unwatch(&format!("{home}/device"), "abs").unwrap();
    guest.watch("sentinel", "s").unwrap();
    assert_eq!(next(&events), ev("sentinel", "s"));
    guest.write("device/y", "1").unwrap();
    guest.write("sentinel", "1").unwrap();
    assert_eq!(next(&events), ev("sentinel", "s"));
}

#[test]
fn unwatch_stops_events() {
    let h = Harness::new();
    let xs = h.client(0);
    let writer = h.client(0);
    let events = with_sentinel(&xs);
    xs.watch("/k", "t1").unwrap();
    xs.watch("/k", "t2").unwrap();
    assert_eq!(next(&events), ev("/k", "t1"));
    assert_eq!(next(&events), ev("/k", "t2"));
    xs.unwatch("/k", "t1").unwrap();
    writer.write("/k", "v").unwrap();
    assert_eq!(next(&events), ev("/k", "t2"));
    xs.unwatch("/k", "t2").unwrap();
    writer.write("/k", "w").unwrap();
    expect_only_sentinel(&xs, &events, &writer);
}

#[test]
fn events_respect_read_permission() {
    let h = Harness::new();
    let dom0 = h.client(0);
    let home = h.make_home(&dom0, 5);
    let guest = h.client(5);
    let events = guest.watch_events();
    // A guest may watch anything, but only hears about what it may read.
    guest.watch("/", "root").unwrap();
    assert_eq!(next(&events), ev("/", "root"));
    dom0.write("/private", "x").unwrap();
    dom0.mkdir("/public").unwrap();
    dom0.set_perms("/public", &[xenstore::Perm::new(0, xenstore::Access::Read)])
        .unwrap();
    assert_eq!(next(&events), ev("/public", "root"));
    dom0.write(&format!("{home}/x"), "1").unwrap();
    assert_eq!(next(&events), ev(&format!("{home}/x"), "root"));
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn special_domain_watches() {
    let h = Harness::new();
    let dom0 = h.client(0);
    let events = dom0.watch_events();
    dom0.watch("@introduceDomain", "intro").unwrap();
    assert_eq!(next(&events), ev("@introduceDomain", "intro"));
    dom0.watch("@releaseDomain", "rel").unwrap();
    assert_eq!(next(&events), ev("@releaseDomain", "rel"));

    h.server.introduce_domain(7);
    assert_eq!(next(&events), ev("@introduceDomain", "intro"));

    // The guest watches too; it must not learn about domain lifecycle.
    let guest = h.client(7);
    let guest_events = guest.watch_events();
    guest.watch("@releaseDomain", "g").unwrap();
    assert_eq!(next(&guest_events), ev("@releaseDomain", "g"));
    guest.watch("/x", "live").unwrap();
    assert_eq!(next(&guest_events), ev("/x", "live"));
    guest.write("/x", "1").unwrap_err();

    h.server.release_domain(7);
    assert_eq!(next(&events), ev("@releaseDomain", "rel"));
    // Release closed the guest's connection and dropped its watches.
    assert_eq!(
        guest_events.recv_timeout(TIMEOUT),
        Err(RecvTimeoutError::Disconnected)
    );
    assert!(matches!(
        guest.read("/x"),
        Err(xenstore::Error::Disconnected) | Err(xenstore::Error::Io(_))
    ));
    assert!(!guest.is_connected());
    h.eventually("guest connection gone", || {
        h.server.connection_stats().iter().all(|s| s.domid != 7)
    });

    // A released domain id can connect again (a new domain with that id).
    h.server.introduce_domain(7);
    assert_eq!(next(&events), ev("@introduceDomain", "intro"));
    let again = h.client(7);
    assert_eq!(again.get_domain_path(7).unwrap(), "/local/domain/7");
}

#[test]
fn introduce_and_release_over_the_wire() {
    use xenstore::wire::MsgType;
    let h = Harness::new();
    let dom0 = h.client(0);
    let events = dom0.watch_events();
    dom0.watch("@introduceDomain", "i").unwrap();
    assert_eq!(next(&events), ev("@introduceDomain", "i"));
    assert!(!dom0.is_domain_introduced(9).unwrap());
    dom0.introduce_domain(9, 12345, 4).unwrap();
    assert_eq!(next(&events), ev("@introduceDomain", "i"));
    assert!(dom0.is_domain_introduced(9).unwrap());
    assert_eq!(
        dom0.raw_request(MsgType::IsDomainIntroduced, b"9\0")
            .unwrap(),
        b"T\0"
    );
    // Malformed INTRODUCE: bad frame number, missing arguments.
    assert!(matches!(
        dom0.raw_request(MsgType::Introduce, b"9\0x\x004\0"),
        Err(xenstore::Error::Xs(xenstore::Errno::Einval))
    ));
    assert!(matches!(
        dom0.raw_request(MsgType::Introduce, b"9\0"),
        Err(xenstore::Error::Xs(xenstore::Errno::Einval))
    ));
    dom0.release_domain(9).unwrap();
    assert!(!dom0.is_domain_introduced(9).unwrap());
    assert!(dom0.is_domain_introduced(0).unwrap());
    let guest = h.client(9);
    assert!(matches!(
        guest.raw_request(MsgType::Release, b"0\0"),
        Err(xenstore::Error::Xs(xenstore::Errno::Eacces))
    ));
}

#[test]
fn reset_watches() {
    use xenstore::wire::MsgType;
    let h = Harness::new();
    let xs = h.client(0);
    let events = xs.watch_events();
    xs.watch("/r", "t").unwrap();
    assert_eq!(next(&events), ev("/r", "t"));
    xs.raw_request(MsgType::ResetWatches, b"").unwrap();
    xs.write("/r", "1").unwrap();
    xs.watch("/s", "s").unwrap();
    assert_eq!(next(&events), ev("/s", "s"));
}

/// A daemon waits on the event handle's file descriptor with poll(2), next
/// to its other descriptors.
#[test]
fn event_fd_is_pollable() {
    let h = Harness::new();
    let xs = h.client(0);
    let writer = h.client(0);
    let events = xs.watch_events();
    let poll_readable = |timeout_ms: i32| {
        let mut pfd = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and
        // nfds is 1; the fd stays open because `events` outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        assert!(n >= 0);
        n == 1 && pfd.revents & libc::POLLIN != 0
    };
    assert!(!poll_readable(0));
    xs.watch("/p", "t").unwrap();
    assert!(poll_readable(TIMEOUT.as_millis() as i32));
    assert_eq!(events.try_recv().unwrap(), ev("/p", "t"));
    assert!(!poll_readable(0));
    writer.write("/p", "1").unwrap();
    writer.write("/p", "2").unwrap();
    assert!(poll_readable(TIMEOUT.as_millis() as i32));
    assert_eq!(next(&events), ev("/p", "t"));
    assert_eq!(next(&events), ev("/p", "t"));
    assert!(!poll_readable(0));
    drop(xs);
    // Closed connection: readable, and the handle reports it.
    assert!(poll_readable(TIMEOUT.as_millis() as i32));
    assert_eq!(events.try_recv(), Err(TryRecvError::Disconnected));
}

#[test]
fn watches_fire_on_commit_only() {
    let h = Harness::new();
    let xs = h.client(0);
    let watcher = h.client(0);
    let events = with_sentinel(&watcher);
    watcher.watch("/txw", "t").unwrap();
    assert_eq!(next(&events), ev("/txw", "t"));

    let tx = xs.transaction_start().unwrap();
    tx.write("/txw/a", "1").unwrap();
    tx.write("/txw/a", "2").unwrap();
    tx.abort().unwrap();
    expect_only_sentinel(&watcher, &events, &xs);

    let tx = xs.transaction_start().unwrap();
    tx.write("/txw/a", "1").unwrap();
    tx.write("/txw/a", "2").unwrap();
    tx.write("/txw/b", "2").unwrap();
    expect_only_sentinel(&watcher, &events, &xs);
    tx.commit().unwrap();
    let mut got = vec![next(&events), next(&events)];
    got.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(got, [ev("/txw/a", "t"), ev("/txw/b", "t")]);
    expect_only_sentinel(&watcher, &events, &xs);
}
