//! The simulated xenstored over raw wire messages: permissions as an
//! unprivileged domain, inheritance, watches, transactions, quotas, hostile
//! clients; and the real xenstore-utils against it when installed.
//!
//! "No event" checks are exact, not timed: a watcher's events are queued
//! while the change is processed, so a request it sends afterwards is
//! answered after any event it was due.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use xen_sim::xenstored::{Quotas, SocketServer, Xenstored, XenstoredConfig};
use xs_wire::{Decoder, Message, MsgType, XsErrno};

/// A raw wire client: sends one request, collects events until the reply.
struct Conn {
    stream: UnixStream,
    dec: Decoder,
    next_req: u32,
    events: std::collections::VecDeque<(String, String)>,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        // A safety net against a hung test, not an assertion on time.
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn { stream, dec: Decoder::new(), next_req: 1, events: Default::default() }
    }

    fn socket(server: &SocketServer) -> Self {
        Conn::new(UnixStream::connect(server.path()).unwrap())
    }

    fn domain(xs: &Arc<Xenstored>, domid: u32) -> Self {
        Conn::new(xs.connect_as(domid).unwrap())
    }

    fn read_message(&mut self) -> Option<Message> {
        let mut buf = [0u8; 1];
        loop {
            let n = match self.stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            };
            if n == 0 {
                return None;
            }
            if let (_, Some(m)) = self.dec.decode(&buf[..n]).unwrap() {
                return Some(m);
            }
        }
    }

    /// Sends a request and returns its reply, keeping events that came first.
    fn request(&mut self, t: MsgType, tx: u32, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let req = self.next_req;
        self.next_req += 1;
        let msg = Message::new(t, req, tx, payload.to_vec()).unwrap();
        self.stream.write_all(&msg.encode()).unwrap();
        loop {
            let m = self.read_message().expect("connection closed before the reply");
            if m.msg_type == MsgType::WATCH_EVENT {
                self.push_event(&m);
                continue;
            }
            assert_eq!((m.req_id, m.tx_id), (req, tx), "reply ids echo the request");
            return match m.as_error() {
                Some(e) => Err(e),
                None => {
                    assert_eq!(m.msg_type, t);
                    Ok(m.payload)
                }
            };
        }
    }

    fn push_event(&mut self, m: &Message) {
        let parts = m.strings();
        let s = |i: usize| String::from_utf8(parts[i].to_vec()).unwrap();
        self.events.push_back((s(0), s(1)));
    }

    /// The next event, reading until one arrives.
    fn event(&mut self) -> (String, String) {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let m = self.read_message().expect("connection closed before an event");
        assert_eq!(m.msg_type, MsgType::WATCH_EVENT);
        self.push_event(&m);
        self.events.pop_front().unwrap()
    }

    /// Every event due so far (exact: a round trip flushes them).
    fn drain_events(&mut self) -> Vec<(String, String)> {
        self.request(MsgType::GET_DOMAIN_PATH, 0, b"0\0").unwrap();
        self.events.drain(..).collect()
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, XsErrno> {
        self.request(MsgType::READ, 0, &nul(path))
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), XsErrno> {
        self.write_tx(0, path, value)
    }

    fn write_tx(&mut self, tx: u32, path: &str, value: &str) -> Result<(), XsErrno> {
        let mut p = nul(path);
        p.extend_from_slice(value.as_bytes());
        self.request(MsgType::WRITE, tx, &p).map(|r| assert_eq!(r, b"OK\0"))
    }

    fn set_perms(&mut self, path: &str, perms: &[&str]) -> Result<(), XsErrno> {
        let mut p = nul(path);
        for x in perms {
            p.extend_from_slice(&nul(x));
        }
        self.request(MsgType::SET_PERMS, 0, &p).map(|_| ())
    }

    fn watch(&mut self, path: &str, token: &str) -> Result<(), XsErrno> {
        let mut p = nul(path);
        p.extend_from_slice(&nul(token));
        self.request(MsgType::WATCH, 0, &p).map(|_| ())
    }

    fn start(&mut self) -> u32 {
        let r = self.request(MsgType::TRANSACTION_START, 0, b"\0").unwrap();
        std::str::from_utf8(r.strip_suffix(b"\0").unwrap()).unwrap().parse().unwrap()
    }

    fn end(&mut self, tx: u32, commit: bool) -> Result<(), XsErrno> {
        self.request(MsgType::TRANSACTION_END, tx, if commit { b"T\0" } else { b"F\0" }).map(|_| ())
    }

    /// Whether the server closed the connection (reads EOF).
    fn is_closed(&mut self) -> bool {
        self.read_message().is_none()
    }
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn ev(p: &str, t: &str) -> (String, String) {
    (p.to_string(), t.to_string())
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("xs-sim-{}-{name}.sock", std::process::id()))
}

fn serve(name: &str) -> (Arc<Xenstored>, SocketServer) {
    let xs = Xenstored::new();
    let s = xs.serve_socket(&socket_path(name)).unwrap();
    (xs, s)
}

/// Dom0 makes `/local/domain/<d>` owned by `d`, as the toolstack does.
fn make_home(dom0: &mut Conn, d: u32) {
    let home = format!("/local/domain/{d}");
    dom0.request(MsgType::MKDIR, 0, &nul(&home)).unwrap();
    dom0.set_perms(&home, &[&format!("n{d}")]).unwrap();
}

#[test]
fn unprivileged_domain_gets_eacces_where_xenstored_does() {
    let (xs, s) = serve("perms");
    let mut dom0 = Conn::socket(&s);
    make_home(&mut dom0, 5);
    make_home(&mut dom0, 6);
    let mut d5 = Conn::domain(&xs, 5);

    assert_eq!(d5.read("/tool").unwrap_err(), XsErrno::EACCES);
    assert_eq!(d5.read("/nothing").unwrap_err(), XsErrno::EACCES, "root is n0: no ENOENT leak");
    assert_eq!(d5.read("data/none").unwrap_err(), XsErrno::ENOENT, "own home readable");
    assert_eq!(d5.write("/local/domain/6/x", "1").unwrap_err(), XsErrno::EACCES);
    assert_eq!(d5.request(MsgType::RM, 0, &nul("/tool")).unwrap_err(), XsErrno::EACCES);
    assert_eq!(d5.request(MsgType::INTRODUCE, 0, b"7\x0012\x003\0").unwrap_err(), XsErrno::EACCES);
    assert_eq!(d5.request(MsgType::IS_DOMAIN_INTRODUCED, 0, b"0\0").unwrap_err(), XsErrno::EACCES);
    d5.write("data/x", "v").unwrap();
    assert_eq!(d5.read("/local/domain/5/data/x").unwrap(), b"v");
    assert_eq!(
        d5.set_perms("data/x", &["n6"]).unwrap_err(),
        XsErrno::EINVAL,
        "EPERM (giving the node away) is sent as EINVAL"
    );
    d5.set_perms("data/x", &["n5", "r6"]).unwrap();
    let mut d6 = Conn::domain(&xs, 6);
    assert_eq!(d6.read("/local/domain/5/data/x").unwrap(), b"v");
    assert_eq!(d6.write("/local/domain/5/data/x", "w").unwrap_err(), XsErrno::EACCES);
}

#[test]
fn new_nodes_inherit_parent_permissions_with_creator_as_owner() {
    let (xs, s) = serve("inherit");
    let mut dom0 = Conn::socket(&s);
    make_home(&mut dom0, 5);
    dom0.set_perms("/local/domain/5", &["n5", "r7"]).unwrap();
    let mut d5 = Conn::domain(&xs, 5);
    d5.write("a/b", "x").unwrap();
    assert_eq!(d5.request(MsgType::GET_PERMS, 0, &nul("a/b")).unwrap(), b"n5\0r7\0");
    dom0.write("/local/domain/5/c", "").unwrap();
    assert_eq!(dom0.request(MsgType::GET_PERMS, 0, &nul("/local/domain/5/c")).unwrap(), b"n5\0r7\0");
    assert_eq!(Conn::domain(&xs, 7).read("/local/domain/5/a/b").unwrap(), b"x");
    assert_eq!(Conn::domain(&xs, 8).read("/local/domain/5/a/b").unwrap_err(), XsErrno::EACCES);
    assert_eq!(dom0.request(MsgType::DIRECTORY, 0, &nul("/local/domain/5")).unwrap(), b"a\0c\0");
}

#[test]
fn watch_fires_on_registration_relative_and_for_descendants() {
    let (xs, s) = serve("watch-rel");
    let mut dom0 = Conn::socket(&s);
    make_home(&mut dom0, 5);
    let mut d5 = Conn::domain(&xs, 5);
    d5.watch("device", "tok").unwrap();
    assert_eq!(d5.event(), ev("device", "tok"));
    dom0.write("/local/domain/5/device/vbd/1", "").unwrap();
    assert_eq!(d5.event(), ev("device/vbd/1", "tok"));
    dom0.write("/local/domain/5/other", "").unwrap();
    assert_eq!(d5.drain_events(), vec![], "sibling change is not below the watch");
    assert_eq!(d5.watch("device", "tok").unwrap_err(), XsErrno::EEXIST);
    d5.request(MsgType::UNWATCH, 0, b"device\0tok\0").unwrap();
    assert_eq!(d5.request(MsgType::UNWATCH, 0, b"device\0tok\0").unwrap_err(), XsErrno::ENOENT);
}

#[test]
fn rm_of_ancestor_fires_watches_on_removed_children() {
    let (_xs, s) = serve("watch-rm");
    let mut dom0 = Conn::socket(&s);
    dom0.write("/x/y/z", "1").unwrap();
    let mut w = Conn::socket(&s);
    w.watch("/x/y/z", "deep").unwrap();
    w.watch("/x", "top").unwrap();
    assert_eq!(w.drain_events(), vec![ev("/x/y/z", "deep"), ev("/x", "top")]);
    dom0.request(MsgType::RM, 0, &nul("/x")).unwrap();
    assert_eq!(w.drain_events(), vec![ev("/x/y/z", "deep"), ev("/x", "top")]);
    assert_eq!(dom0.read("/x/y").unwrap_err(), XsErrno::ENOENT);
    assert_eq!(dom0.request(MsgType::RM, 0, &nul("/x")).unwrap(), b"OK\0", "parent exists");
    assert_eq!(dom0.request(MsgType::RM, 0, &nul("/x/y")).unwrap_err(), XsErrno::ENOENT);
}

#[test]
fn watch_events_only_reach_watchers_that_may_read() {
    let (xs, s) = serve("watch-perm");
    let mut dom0 = Conn::socket(&s);
    make_home(&mut dom0, 5);
    dom0.write("/local/domain/5/secret", "").unwrap();
    let mut d6 = Conn::domain(&xs, 6);
    d6.watch("/local/domain/5/secret", "t").unwrap();
    assert_eq!(d6.drain_events(), vec![ev("/local/domain/5/secret", "t")], "registration always fires");
    dom0.write("/local/domain/5/secret", "changed").unwrap();
    assert_eq!(d6.drain_events(), vec![]);
    dom0.set_perms("/local/domain/5/secret", &["n5", "r6"]).unwrap();
    assert_eq!(d6.drain_events(), vec![ev("/local/domain/5/secret", "t")]);
    dom0.set_perms("/local/domain/5/secret", &["n5"]).unwrap();
    assert_eq!(d6.drain_events(), vec![ev("/local/domain/5/secret", "t")], "losing access is reported");
    dom0.write("/local/domain/5/secret", "again").unwrap();
    assert_eq!(d6.drain_events(), vec![]);
}

#[test]
fn transaction_conflict_gives_eagain_and_commit_fires_watches() {
    let (_xs, s) = serve("tx");
    let mut a = Conn::socket(&s);
    let mut b = Conn::socket(&s);
    let mut w = Conn::socket(&s);
    a.write("/t/v", "0").unwrap();
    w.watch("/t", "w").unwrap();
    w.drain_events();

    let tx = a.start();
    assert_eq!(a.request(MsgType::READ, tx, &nul("/t/v")).unwrap(), b"0");
    a.write_tx(tx, "/t/v", "a").unwrap();
    assert_eq!(b.read("/t/v").unwrap(), b"0", "uncommitted write is private");
    assert_eq!(w.drain_events(), vec![], "nothing fires before commit");
    b.write("/t/v", "b").unwrap();
    w.drain_events();
    assert_eq!(a.end(tx, true).unwrap_err(), XsErrno::EAGAIN);
    assert_eq!(b.read("/t/v").unwrap(), b"b");
    assert_eq!(a.end(tx, true).unwrap_err(), XsErrno::ENOENT, "the failed transaction is gone");

    let tx = a.start();
    a.write_tx(tx, "/t/n", "new").unwrap();
    a.end(tx, true).unwrap();
    assert_eq!(b.read("/t/n").unwrap(), b"new");
    assert_eq!(w.drain_events(), vec![ev("/t/n", "w")]);

    let tx = a.start();
    a.write_tx(tx, "/t/aborted", "x").unwrap();
    a.end(tx, false).unwrap();
    assert_eq!(b.read("/t/aborted").unwrap_err(), XsErrno::ENOENT);
    assert_eq!(a.request(MsgType::READ, 999, &nul("/t/v")).unwrap_err(), XsErrno::ENOENT);
    assert_eq!(a.request(MsgType::TRANSACTION_END, 0, b"T\0").unwrap_err(), XsErrno::ENOENT);
    assert_eq!(a.request(MsgType::TRANSACTION_END, 0, b"X\0").unwrap_err(), XsErrno::EINVAL);
}

#[test]
fn transaction_sees_its_first_copy_of_each_node_as_test_xenstore_ta_err_does() {
    // test-xenstore's "ta err": TRANSACTION_START; READ in it; WRITE outside;
    // READ in it must still answer the first value, and the commit EAGAIN.
    let (_xs, s) = serve("tx-snapshot");
    let mut a = Conn::socket(&s);
    let mut b = Conn::socket(&s);
    a.write("/s/v", "a").unwrap();
    a.write("/s/list/x", "").unwrap();

    let tx = a.start();
    assert_eq!(a.request(MsgType::READ, tx, &nul("/s/v")).unwrap(), b"a");
    assert_eq!(a.request(MsgType::DIRECTORY, tx, &nul("/s/list")).unwrap(), b"x\0");
    b.write("/s/v", "b").unwrap();
    b.write("/s/list/y", "").unwrap();
    assert_eq!(a.request(MsgType::READ, tx, &nul("/s/v")).unwrap(), b"a");
    assert_eq!(a.request(MsgType::DIRECTORY, tx, &nul("/s/list")).unwrap(), b"x\0");
    a.write_tx(tx, "/s/v", "c").unwrap();
    assert_eq!(a.request(MsgType::READ, tx, &nul("/s/v")).unwrap(), b"c");
    assert_eq!(a.end(tx, true).unwrap_err(), XsErrno::EAGAIN);
    assert_eq!(b.read("/s/v").unwrap(), b"b");

    let tx = a.start();
    assert_eq!(a.request(MsgType::READ, tx, &nul("/s/v")).unwrap(), b"b");
    b.write("/s/other", "").unwrap();
    a.write_tx(tx, "/s/v", "d").unwrap();
    a.end(tx, true).expect("a change to a node not accessed is no conflict");
    assert_eq!(b.read("/s/v").unwrap(), b"d");
}

#[test]
fn unknown_types_get_enosys_and_malformed_payloads_einval() {
    let (_xs, s) = serve("types");
    let mut c = Conn::socket(&s);
    for t in [MsgType(20), MsgType::WATCH_EVENT, MsgType::ERROR, MsgType::GET_FEATURE, MsgType(999)] {
        assert_eq!(c.request(t, 0, b"").unwrap_err(), XsErrno::ENOSYS, "{t:?}");
    }
    assert_eq!(c.request(MsgType::READ, 0, b"/tool").unwrap_err(), XsErrno::EINVAL, "no NUL");
    assert_eq!(c.request(MsgType::READ, 0, b"/tool\0x\0").unwrap_err(), XsErrno::EINVAL, "two args");
    assert_eq!(c.request(MsgType::WRITE, 0, b"/a b\0v").unwrap_err(), XsErrno::EINVAL);
    assert_eq!(c.request(MsgType::WATCH, 0, b"/a\0").unwrap_err(), XsErrno::EINVAL);
    assert_eq!(c.request(MsgType::GET_DOMAIN_PATH, 0, b"7\0").unwrap(), b"/local/domain/7\0");
    assert_eq!(c.read("/tool").unwrap(), b"", "the connection still works");
}

#[test]
fn quotas_give_xenstored_errors_to_domains_only() {
    let quotas = Quotas { nodes: 3, watches: 1, transactions: 1, node_size: 100, ..Quotas::default() };
    let xs = Xenstored::with_config(XenstoredConfig { quotas, ..XenstoredConfig::default() });
    let s = xs.serve_socket(&socket_path("quota")).unwrap();
    let mut dom0 = Conn::socket(&s);
    make_home(&mut dom0, 5);
    let mut d5 = Conn::domain(&xs, 5);

    d5.write("a", "").unwrap();
    assert_eq!(d5.write("c/d", "").unwrap_err(), XsErrno::ENOSPC, "home + a owned, 2 more is over 3");
    d5.write("b", "").unwrap();
    assert_eq!(d5.write("e", "").unwrap_err(), XsErrno::ENOSPC);
    assert_eq!(dom0.read("/local/domain/5/c").unwrap_err(), XsErrno::ENOENT, "nothing half-created");
    assert_eq!(d5.write("a", &"x".repeat(100)).unwrap_err(), XsErrno::ENOSPC, "node size");
    dom0.write("/local/domain/5/big", &"x".repeat(3000)).unwrap();

    d5.watch("a", "1").unwrap();
    d5.watch("a", "2").unwrap();
    assert_eq!(d5.watch("a", "3").unwrap_err(), XsErrno::E2BIG);
    d5.start();
    d5.start();
    assert_eq!(d5.request(MsgType::TRANSACTION_START, 0, b"\0").unwrap_err(), XsErrno::ENOSPC);
    for i in 0..5 {
        dom0.watch("/", &format!("dom0-{i}")).unwrap();
    }
}

#[test]
fn oversized_frame_disconnects_only_that_client() {
    let (xs, s) = serve("garbage");
    let mut good = Conn::socket(&s);
    good.write("/g", "1").unwrap();
    let mut bad = Conn::socket(&s);
    let mut frame = vec![2u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&5000u32.to_le_bytes());
    bad.stream.write_all(&frame).unwrap();
    assert!(bad.is_closed());
    let mut bad_domain = Conn::domain(&xs, 9);
    bad_domain.stream.write_all(&[0xff; 64]).unwrap();
    assert!(bad_domain.is_closed());
    assert_eq!(good.read("/g").unwrap(), b"1");
    assert_eq!(xs.stats().bad_clients, 2);
}

#[test]
fn watcher_that_never_reads_loses_events_not_memory() {
    let config = XenstoredConfig { out_queue_bytes: 1024, ..XenstoredConfig::default() };
    let xs = Xenstored::with_config(config);
    let s = xs.serve_socket(&socket_path("slow")).unwrap();
    let mut lazy = Conn::socket(&s);
    lazy.watch("/", "lazy").unwrap();
    let mut writer = Conn::socket(&s);
    // Distinct long paths: identical pending events would be merged. Keep
    // writing until the socket buffer and then the 1 KiB queue are full.
    let long = "x".repeat(400);
    let mut i = 0;
    while xs.stats().events_dropped == 0 {
        assert!(i < 100_000, "no event dropped after {i} writes: {:?}", xs.stats());
        writer.write(&format!("/{long}{}", i % 200), &i.to_string()).unwrap();
        i += 1;
    }
    assert_eq!(writer.read(&format!("/{long}{}", (i - 1) % 200)).unwrap(), (i - 1).to_string().as_bytes());
    // The lazy watcher is still served: its queued events, then its reply.
    assert_eq!(lazy.read("/tool").unwrap(), b"");
    assert!(!lazy.events.is_empty());
}

#[test]
fn introduce_and_release_fire_special_watches() {
    let (xs, s) = serve("domains");
    let mut dom0 = Conn::socket(&s);
    dom0.watch("@introduceDomain", "in").unwrap();
    dom0.watch("@releaseDomain", "out").unwrap();
    assert_eq!(dom0.drain_events(), vec![ev("@introduceDomain", "in"), ev("@releaseDomain", "out")]);
    let mut d3 = Conn::domain(&xs, 3);
    d3.watch("@introduceDomain", "d3").unwrap();
    d3.drain_events();

    dom0.request(MsgType::INTRODUCE, 0, b"3\x00123\x004\0").unwrap();
    assert_eq!(dom0.drain_events(), vec![ev("@introduceDomain", "in")]);
    assert_eq!(d3.drain_events(), vec![], "@introduceDomain is n0: dom0 only");
    assert_eq!(dom0.request(MsgType::IS_DOMAIN_INTRODUCED, 0, b"3\0").unwrap(), b"T\0");
    assert_eq!(dom0.request(MsgType::INTRODUCE, 0, b"3\x00123\x000\0").unwrap_err(), XsErrno::EINVAL);
    xs.introduce_domain(4);
    assert_eq!(dom0.drain_events(), vec![ev("@introduceDomain", "in")]);

    dom0.request(MsgType::RELEASE, 0, b"3\0").unwrap();
    assert_eq!(dom0.drain_events(), vec![ev("@releaseDomain", "out")]);
    assert!(d3.is_closed(), "a released domain's connection goes away");
    assert_eq!(dom0.request(MsgType::IS_DOMAIN_INTRODUCED, 0, b"3\0").unwrap(), b"F\0");
    assert_eq!(dom0.request(MsgType::RELEASE, 0, b"3\0").unwrap_err(), XsErrno::ENOENT);
    assert_eq!(dom0.request(MsgType::RELEASE, 0, b"0\0").unwrap_err(), XsErrno::EINVAL);
    xs.release_domain(4);
    assert_eq!(dom0.drain_events(), vec![ev("@releaseDomain", "out")]);
}

#[test]
fn set_target_gives_a_domain_the_targets_nodes() {
    let (xs, s) = serve("target");
    let mut dom0 = Conn::socket(&s);
    make_home(&mut dom0, 5);
    dom0.write("/local/domain/5/x", "1").unwrap();
    xs.introduce_domain(5);
    xs.introduce_domain(8);
    let mut d8 = Conn::domain(&xs, 8);
    assert_eq!(d8.read("/local/domain/5/x").unwrap_err(), XsErrno::EACCES);
    dom0.request(MsgType::SET_TARGET, 0, b"8\x005\0").unwrap();
    assert_eq!(d8.read("/local/domain/5/x").unwrap(), b"1");
    assert_eq!(dom0.request(MsgType::SET_TARGET, 0, b"8\x0077\0").unwrap_err(), XsErrno::ENOENT);
}

#[test]
fn dropping_the_socket_server_closes_connections_and_removes_the_file() {
    let (_xs, s) = serve("drop");
    let path = s.path().to_path_buf();
    let mut c = Conn::socket(&s);
    c.write("/a", "1").unwrap();
    drop(s);
    assert!(!path.exists());
    assert!(c.is_closed());
}

#[test]
fn xenstore_utils_cannot_tell_it_from_xenstored() {
    if std::process::Command::new("xenstore-write").arg("--help").output().is_err() {
        println!("skipped: xenstore-utils (xenstore-write) not installed");
        return;
    }
    let (xs, s) = serve("utils");
    let tool = |args: &[&str]| {
        let out =
            std::process::Command::new(args[0]).args(&args[1..]).env("XENSTORED_PATH", s.path()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(tool(&["xenstore-write", "/a/b", "x y"]).0, Some(0));
    assert_eq!(xs.read_node("/a/b").unwrap(), b"x y");
    assert_eq!(tool(&["xenstore-read", "/a/b"]), (Some(0), "x y\n".to_string()));
    assert_eq!(
        tool(&["xenstore-ls", "/"]),
        (Some(0), "tool = \"\"\n xenstored = \"\"\na = \"\"\n b = \"x y\"\n".to_string())
    );
    assert_eq!(tool(&["xenstore-list", "/"]), (Some(0), "tool\na\n".to_string()));
    assert_eq!(tool(&["xenstore-exists", "/a/c"]).0, Some(1));
    assert_eq!(tool(&["xenstore-chmod", "/a/b", "r5", "w6"]).0, Some(0));
    assert_eq!(xs.node_perms("/a/b").unwrap().iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["r5", "w6"]);
    assert_eq!(tool(&["xenstore-rm", "/a"]).0, Some(0));
    assert_eq!(tool(&["xenstore-read", "/a/b"]).0, Some(1));
    let mut watch = std::process::Command::new("xenstore-watch")
        .args(["-n", "2", "/w"])
        .env("XENSTORED_PATH", s.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first event (registration) is printed once the watch exists.
    let mut out = watch.stdout.take().unwrap();
    let mut first = [0u8; 3];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"/w\n");
    assert_eq!(tool(&["xenstore-write", "/w/x", "1"]).0, Some(0));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "/w/x\n");
    assert!(watch.wait().unwrap().success());
}

/// Issue 17: a second server refuses a socket a live one serves (its
/// clients keep their store), replaces one left by a dead server, and a
/// server never removes a socket file that is no longer its own.
#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let path = socket_path("live");
    let (first, server) = serve("live");
    first.connect_as(0).unwrap();
    let err = Xenstored::new().serve_socket(&path).err().expect("a live socket is refused");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(path.exists(), "the refused start left the live socket alone");
    drop(server);
    assert!(!path.exists(), "the server removed its own socket");

    // Stale: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let second = Xenstored::new().serve_socket(&path).expect("a stale socket is replaced");
    // Someone else's file at the path by the time we stop: left alone.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"not ours").unwrap();
    drop(second);
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours");
    std::fs::remove_file(&path).unwrap();
}
