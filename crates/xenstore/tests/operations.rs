//! Client against server: every operation, the error replies, and Xen's
//! permission model for guest domains.

mod common;

use std::sync::Arc;

use common::Harness;
use xenstore::{Access, Errno, Error, Perm, XsOps};

fn errno<T: std::fmt::Debug>(r: Result<T, Error>) -> Errno {
    match r {
        Err(Error::Xs(e)) => e,
        other => panic!("expected an xenstore error, got {other:?}"),
    }
}

#[test]
fn read_write_mkdir_rm_directory() {
    let h = Harness::new();
    let xs = h.client(0);
    xs.write("/vm/a/b", "hello").unwrap();
    assert_eq!(xs.read("/vm/a/b").unwrap(), b"hello");
    assert_eq!(xs.read_string("/vm/a/b").unwrap(), "hello");
    // Parents were created, empty.
    assert_eq!(xs.read("/vm/a").unwrap(), b"");
    // Binary values, embedded NULs included, round-trip.
    xs.write("/vm/bin", [0u8, 1, 0, 255]).unwrap();
    assert_eq!(xs.read("/vm/bin").unwrap(), [0u8, 1, 0, 255]);
    // Overwrite.
    xs.write("/vm/a/b", "").unwrap();
    assert_eq!(xs.read("/vm/a/b").unwrap(), b"");

    xs.mkdir("/vm/dir").unwrap();
    xs.mkdir("/vm/dir").unwrap(); // existing: fine
    xs.write("/vm/dir", "keep").unwrap();
    xs.mkdir("/vm/dir").unwrap();
    assert_eq!(
        xs.read("/vm/dir").unwrap(),
        b"keep",
        "mkdir leaves an existing node alone"
    );

    let mut names = xs.directory("/vm").unwrap();
    names.sort();
    assert_eq!(names, ["a", "bin", "dir"]);
    assert!(xs.directory("/vm/bin").unwrap().is_empty());
    let mut root = xs.directory("/").unwrap();
    root.sort();
    assert_eq!(root, ["vm"]);

    xs.rm("/vm/a").unwrap();
    assert!(xs.read("/vm/a/b").unwrap_err().is_not_found());
    assert!(!xs.exists("/vm/a").unwrap());
    assert_eq!(xs.read_opt("/vm/a").unwrap(), None);
    assert_eq!(xs.read_opt("/vm/bin").unwrap(), Some(vec![0, 1, 0, 255]));
    assert_eq!(xs.directory("/vm").unwrap().len(), 2);
    assert_eq!(h.server.read("/vm/dir").as_deref(), Some(&b"keep"[..]));
}

#[test]
fn error_replies() {
    let h = Harness::new();
    let xs = h.client(0);
    assert_eq!(errno(xs.read("/missing")), Errno::Enoent);
    assert_eq!(errno(xs.directory("/missing")), Errno::Enoent);
    assert_eq!(errno(xs.get_perms("/missing")), Errno::Enoent);
    assert_eq!(
        errno(xs.set_perms("/missing", &[Perm::new(0, Access::None)])),
        Errno::Enoent
    );
    // Removing a missing node is fine if its parent exists, not otherwise.
    xs.rm("/missing").unwrap();
    assert_eq!(errno(xs.rm("/missing/child")), Errno::Enoent);
    assert_eq!(errno(xs.rm("/")), Errno::Einval);
    for bad in [
        "/trailing/",
        "/double//slash",
        "/bad char",
        "/dot.dot",
        "@special",
    ] {
        assert_eq!(errno(xs.write(bad, "x")), Errno::Einval, "{bad}");
    }
    // NUL inside an argument never reaches the wire.
    assert!(matches!(xs.read("/a\0b"), Err(Error::InvalidArgument(_))));
    // Values larger than one message are refused before sending.
    assert!(matches!(
        xs.write("/big", vec![b'x'; 5000]),
        Err(Error::InvalidArgument(_))
    ));
    xs.watch("/w", "t").unwrap();
    assert_eq!(errno(xs.watch("/w", "t")), Errno::Eexist);
    assert_eq!(errno(xs.unwatch("/w", "other")), Errno::Enoent);
    // Non-UTF-8 value read as a string.
    xs.write("/bin", [0xffu8, 0xfe]).unwrap();
    assert!(matches!(xs.read_string("/bin"), Err(Error::NotUtf8 { .. })));
    assert!(xs.is_connected());
}

#[test]
fn domain_path_and_introduced() {
    let h = Harness::new();
    let xs = h.client(0);
    assert_eq!(xs.get_domain_path(7).unwrap(), "/local/domain/7");
    assert!(h.server.is_domain_introduced(0));
    assert!(!h.server.is_domain_introduced(7));
    h.server.introduce_domain(7);
    assert!(h.server.is_domain_introduced(7));
}

#[test]
fn perms_round_trip_and_inheritance() {
    let h = Harness::new();
    let xs = h.client(0);
    xs.mkdir("/backend/vbd/5").unwrap();
    let perms = [
        Perm::new(0, Access::None),
        Perm::new(5, Access::Read),
        Perm::new(9, Access::Both),
    ];
    xs.set_perms("/backend/vbd/5", &perms).unwrap();
    assert_eq!(xs.get_perms("/backend/vbd/5").unwrap(), perms);
    // A privileged creator keeps the inherited permissions verbatim.
    xs.write("/backend/vbd/5/51712/state", "1").unwrap();
    assert_eq!(xs.get_perms("/backend/vbd/5/51712/state").unwrap(), perms);
    assert_eq!(xs.get_perms("/").unwrap(), [Perm::new(0, Access::None)]);
    assert!(matches!(
        xs.set_perms("/backend", &[]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn guest_permissions() {
    let h = Harness::new();
    let dom0 = h.client(0);
    let home = h.make_home(&dom0, 5);
    let dom5 = h.client(5);
    let dom6 = h.client(6);

    // dom0's nodes are invisible to a guest.
    dom0.write("/secret/key", "x").unwrap();
    assert_eq!(errno(dom5.read("/secret/key")), Errno::Eacces);
    assert_eq!(errno(dom5.directory("/secret")), Errno::Eacces);
    assert_eq!(errno(dom5.write("/secret/key", "y")), Errno::Eacces);
    assert_eq!(errno(dom5.write("/newtop", "y")), Errno::Eacces);
    assert_eq!(errno(dom5.rm("/secret")), Errno::Eacces);
    // A missing node under an unreadable ancestor does not reveal itself.
    assert_eq!(errno(dom5.read("/secret/nothing")), Errno::Eacces);
    assert_eq!(dom0.read("/secret/key").unwrap(), b"x");

    // A guest writes its own home, with relative or absolute paths.
    dom5.write("data/x", "1").unwrap();
    assert_eq!(dom5.read(&format!("{home}/data/x")).unwrap(), b"1");
    assert_eq!(dom0.read(&format!("{home}/data/x")).unwrap(), b"1");
    // What it creates is its own, inherited from the home.
    assert_eq!(
        dom5.get_perms("data/x").unwrap(),
        [Perm::new(5, Access::None)]
    );
    assert_eq!(errno(dom5.read("data/missing")), Errno::Enoent);
    // Other guests see nothing of it.
    assert_eq!(errno(dom6.read(&format!("{home}/data/x"))), Errno::Eacces);

    // A backend directory dom5 may only read.
    dom0.mkdir("/backend/vbd/5").unwrap();
    dom0.set_perms(
        "/backend/vbd/5",
        &[Perm::new(0, Access::None), Perm::new(5, Access::Read)],
    )
    .unwrap();
    dom0.write("/backend/vbd/5/51712/state", "4").unwrap();
    assert_eq!(dom5.read("/backend/vbd/5/51712/state").unwrap(), b"4");
    assert_eq!(
        errno(dom5.write("/backend/vbd/5/51712/state", "6")),
        Errno::Eacces
    );
    assert_eq!(
        errno(dom6.read("/backend/vbd/5/51712/state")),
        Errno::Eacces
    );

    // A shared directory dom5 may write: the guest owns what it creates,
    // keeping the inherited ACL.
    dom0.mkdir("/shared").unwrap();
    dom0.set_perms(
        "/shared",
        &[Perm::new(0, Access::None), Perm::new(5, Access::Both)],
    )
    .unwrap();
    dom5.write("/shared/x", "1").unwrap();
    assert_eq!(
        dom5.get_perms("/shared/x").unwrap(),
        [Perm::new(5, Access::None), Perm::new(5, Access::Both)]
    );

    // Only the owner changes permissions, and a guest cannot give a node away.
    assert_eq!(
        errno(dom5.set_perms("/shared", &[Perm::new(5, Access::Both)])),
        Errno::Eacces
    );
    assert_eq!(
        errno(dom5.set_perms("data/x", &[Perm::new(6, Access::None)])),
        Errno::Eperm
    );
    dom5.set_perms(
        "data/x",
        &[Perm::new(5, Access::None), Perm::new(6, Access::Read)],
    )
    .unwrap();
    assert_eq!(dom6.read(&format!("{home}/data/x")).unwrap(), b"1");
    assert_eq!(
        errno(dom6.write(&format!("{home}/data/x"), "2")),
        Errno::Eacces
    );
}

#[test]
fn concurrent_requests_from_many_threads() {
    let h = Harness::new();
    let xs = Arc::new(h.client(0));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let xs = xs.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let path = format!("/t{t}/n{}", i % 10);
                    let value = format!("{t}-{i}");
                    xs.write(&path, &value).unwrap();
                    assert_eq!(xs.read_string(&path).unwrap(), value);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(xs.directory("/").unwrap().len(), 4);
}

#[test]
fn in_process_connection() {
    let h = Harness::new();
    let stream = h.server.connect_as(0).unwrap();
    let xs = xenstore::XsClient::new(xenstore::Transport::Unix(stream), Harness::config()).unwrap();
    xs.write("/p", "q").unwrap();
    assert_eq!(xs.read("/p").unwrap(), b"q");
}

#[test]
fn long_directories_use_directory_part() {
    let h = Harness::new();
    let xs = h.client(0);
    let mut names: Vec<String> = (0..500).map(|i| format!("vbd-device-{i:05}")).collect();
    xs.transaction(|tx| {
        for n in &names {
            tx.mkdir(&format!("/many/{n}"))?;
        }
        Ok(())
    })
    .unwrap();
    let mut got = xs.directory("/many").unwrap();
    got.sort();
    names.sort();
    assert_eq!(got, names);
}
