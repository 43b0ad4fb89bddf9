//! The xenstore client against the simulated xenstored (every operation,
//! many threads on one connection, pipelining, watches, conflicting
//! transactions, the `XS_DIRECTORY_PART` fallback, the watch queue bound) and
//! against hostile or silent servers.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use xen_sim::xenstored::Xenstored;
use xs_wire::client::{Client, ClientError, Options, Request, TxId};
use xs_wire::{Access, Message, MsgType, Perm, XsErrno};

fn dom0(xs: &Arc<Xenstored>) -> Client {
    Client::from_stream(xs.connect_as(0).expect("connect to simulated xenstored")).expect("client")
}

#[test]
fn every_operation_round_trips() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    c.write(TxId::NONE, "/t/a", b"value with spaces\n\xff").unwrap();
    assert_eq!(c.read(TxId::NONE, "/t/a").unwrap(), b"value with spaces\n\xff");
    c.mkdir(TxId::NONE, "/t/dir").unwrap();
    assert_eq!(c.read(TxId::NONE, "/t/dir").unwrap(), b"");
    let mut names = c.directory(TxId::NONE, "/t").unwrap();
    names.sort();
    assert_eq!(names, vec!["a", "dir"]);
    let perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, 5)];
    c.set_perms(TxId::NONE, "/t/a", &perms).unwrap();
    assert_eq!(c.get_perms(TxId::NONE, "/t/a").unwrap(), perms);
    c.rm(TxId::NONE, "/t/a").unwrap();
    assert_eq!(c.read(TxId::NONE, "/t/a").unwrap_err().errno(), Some(XsErrno::ENOENT));
    assert_eq!(c.get_domain_path(7).unwrap(), "/local/domain/7");
    let tx = c.transaction_start().unwrap();
    c.write(tx, "/t/in-tx", b"1").unwrap();
    assert_eq!(c.read(TxId::NONE, "/t/in-tx").unwrap_err().errno(), Some(XsErrno::ENOENT));
    c.transaction_end(tx, true).unwrap();
    assert_eq!(c.read(TxId::NONE, "/t/in-tx").unwrap(), b"1");
    let tx = c.transaction_start().unwrap();
    c.write(tx, "/t/aborted", b"1").unwrap();
    c.transaction_end(tx, false).unwrap();
    assert_eq!(c.read(TxId::NONE, "/t/aborted").unwrap_err().errno(), Some(XsErrno::ENOENT));
    c.reset_watches().unwrap();
}

#[test]
fn domain_and_control_requests_reach_xenstored() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    assert!(!c.is_domain_introduced(5).unwrap());
    c.introduce(5, 0x1234, 7).unwrap();
    assert!(c.is_domain_introduced(5).unwrap());
    c.set_target(5, 0).unwrap();
    c.resume(5).unwrap();
    c.release(5).unwrap();
    assert!(!c.is_domain_introduced(5).unwrap());
    assert!(!c.control(&[b"print", b"from the client test"]).unwrap().is_empty());
    let guest = Client::from_stream(xs.connect_as(3).unwrap()).unwrap();
    assert_eq!(guest.introduce(4, 1, 1).unwrap_err().errno(), Some(XsErrno::EACCES));
}

#[test]
fn sixteen_threads_share_one_connection_and_every_reply_reaches_its_caller() {
    const THREADS: usize = 16;
    const OPS: usize = 10_000;
    let xs = Xenstored::new();
    let c = dom0(&xs);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..OPS {
                    let key = format!("/mt/t{t}/k{}", i % 8);
                    let value = format!("{t}-{i}");
                    match i % 4 {
                        0 | 1 => c.write(TxId::NONE, &key, value.as_bytes()).unwrap(),
                        2 => {
                            let want = format!("{t}-{}", i - 1);
                            let prev = format!("/mt/t{t}/k{}", (i - 1) % 8);
                            assert_eq!(c.read(TxId::NONE, &prev).unwrap(), want.as_bytes(), "thread {t} op {i}");
                        }
                        _ => {
                            let names: HashSet<String> =
                                c.directory(TxId::NONE, &format!("/mt/t{t}")).unwrap().into_iter().collect();
                            assert!(names.iter().all(|n| n.starts_with('k')), "thread {t} got {names:?}");
                            assert!(names.contains(&format!("k{}", (i - 2) % 8)), "thread {t} op {i}: {names:?}");
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Writes went to keys i % 8 for i % 4 in {0, 1}: k0, k1, k4, k5.
    for t in 0..THREADS {
        let mut names = c.directory(TxId::NONE, &format!("/mt/t{t}")).unwrap();
        names.sort();
        assert_eq!(names, vec!["k0", "k1", "k4", "k5"]);
    }
}

#[test]
fn pipelined_batch_gets_each_reply_in_order() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    let writes: Vec<Request> =
        (0..200).map(|i| Request::write(TxId::NONE, &format!("/p/{i}"), i.to_string().as_bytes()).unwrap()).collect();
    for r in c.batch(&writes).unwrap() {
        r.unwrap();
    }
    let paths: Vec<String> = (0..200).map(|i| format!("/p/{i}")).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let values = c.read_many(TxId::NONE, &refs).unwrap();
    for (i, v) in values.into_iter().enumerate() {
        assert_eq!(v.unwrap(), i.to_string().as_bytes());
    }
}

#[test]
fn watch_reports_changes_with_its_token_until_unwatched() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    let events = c.events();
    c.watch("/w", "my-token").unwrap();
    let first = events.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((first.path.as_str(), first.token.as_str()), ("/w", "my-token"));
    let other = dom0(&xs);
    other.write(TxId::NONE, "/w/child", b"x").unwrap();
    let ev = events.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((ev.path.as_str(), ev.token.as_str()), ("/w/child", "my-token"));
    c.unwatch("/w", "my-token").unwrap();
    other.write(TxId::NONE, "/w/child", b"y").unwrap();
    // A reply after the write proves the event (if any) would have come first.
    c.read(TxId::NONE, "/w/child").unwrap();
    assert!(events.try_recv().is_err());
    assert_eq!(c.dropped_events(), 0);
}

#[test]
fn conflicting_transaction_is_rerun_and_commits_once() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    let other = dom0(&xs);
    c.write(TxId::NONE, "/counter", b"0").unwrap();
    let mut attempts = 0;
    c.transaction(|tx| {
        attempts += 1;
        let v: u32 = String::from_utf8(c.read(tx, "/counter")?).unwrap().parse().unwrap();
        if attempts == 1 {
            // Someone else changes the node in between: the commit must fail with EAGAIN.
            other.write(TxId::NONE, "/counter", b"10").unwrap();
        }
        c.write(tx, "/counter", (v + 1).to_string().as_bytes())
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(c.read(TxId::NONE, "/counter").unwrap(), b"11");
}

#[test]
fn concurrent_increments_in_transactions_lose_no_update() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    c.write(TxId::NONE, "/inc", b"0").unwrap();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let c = dom0(&xs);
            std::thread::spawn(move || {
                for _ in 0..25 {
                    c.transaction(|tx| {
                        let v: u32 = String::from_utf8(c.read(tx, "/inc")?).unwrap().parse().unwrap();
                        c.write(tx, "/inc", (v + 1).to_string().as_bytes())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(c.read(TxId::NONE, "/inc").unwrap(), b"100");
}

#[test]
fn directory_larger_than_one_reply_is_listed_through_directory_part() {
    let xs = Xenstored::new();
    let c = dom0(&xs);
    let names: Vec<String> = (0..300).map(|i| format!("a-rather-long-child-name-{i:05}")).collect();
    assert!(names.iter().map(|n| n.len() + 1).sum::<usize>() > 4096);
    let reqs: Vec<Request> =
        names.iter().map(|n| Request::write(TxId::NONE, &format!("/big/{n}"), b"").unwrap()).collect();
    for r in c.batch(&reqs).unwrap() {
        r.unwrap();
    }
    let direct = c.submit(MsgType::DIRECTORY, TxId::NONE, b"/big\0".to_vec()).unwrap().wait().unwrap_err();
    assert_eq!(direct.errno(), Some(XsErrno::E2BIG));
    let mut got = c.directory(TxId::NONE, "/big").unwrap();
    got.sort();
    assert_eq!(got, names);
}

#[test]
fn overflowing_watch_queue_drops_and_marks_while_replies_flow() {
    let xs = Xenstored::new();
    let opts = Options { watch_queue: 8, ..Options::default() };
    let c = Client::from_transport(Box::new(xs_wire::transport::SocketTransport::new(xs.connect_as(0).unwrap())), opts)
        .unwrap();
    c.watch("/flood", "f").unwrap();
    for i in 0..50 {
        c.write(TxId::NONE, &format!("/flood/{i}"), b"x").unwrap();
    }
    c.read(TxId::NONE, "/flood/0").unwrap();
    let got: Vec<_> = c.events().try_iter().collect();
    assert_eq!(got.len(), 9);
    assert!(got[8].is_overflow());
    assert_eq!(c.dropped_events(), 51 - 8);
}

/// A server that accepts one connection and runs `serve` on it.
fn fake_server(serve: impl FnOnce(UnixStream) + Send + 'static) -> (Client, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        serve(s);
    });
    (Client::connect_socket(&path).unwrap(), dir)
}

/// Reads one request header and payload.
fn read_request(s: &mut UnixStream) -> Option<Message> {
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr).ok()?;
    let u = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; u(12) as usize];
    s.read_exact(&mut payload).ok()?;
    Some(Message { msg_type: MsgType(u(0)), req_id: u(4), tx_id: u(8), payload })
}

#[test]
fn silent_server_gives_timeout_naming_the_type() {
    let (c, _dir) = fake_server(|mut s| while read_request(&mut s).is_some() {});
    c.set_timeout(Duration::from_millis(100));
    let err = c.get_domain_path(1).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { msg_type: MsgType::GET_DOMAIN_PATH, .. }), "{err}");
    assert!(!c.is_dead());
}

#[test]
fn hostile_replies_disconnect_every_waiter_without_panic() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let (c, _dir) = fake_server(move |mut s| {
        // Wait for four requests in flight, then answer with an oversized header.
        for _ in 0..4 {
            read_request(&mut s).unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
        }
        let mut bad = vec![2u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&bad).unwrap();
        while read_request(&mut s).is_some() {}
    });
    let pending: Vec<_> =
        (0..4).map(|i| c.submit(MsgType::READ, TxId::NONE, format!("/{i}\0").into_bytes()).unwrap()).collect();
    for p in pending {
        assert!(matches!(p.wait().unwrap_err(), ClientError::Disconnected { .. }));
    }
    assert!(matches!(c.read(TxId::NONE, "/x").unwrap_err(), ClientError::Disconnected { .. }));
    assert_eq!(seen.load(Ordering::SeqCst), 4);
}

#[test]
fn garbage_reply_then_close_is_a_clean_error() {
    let (c, _dir) = fake_server(|mut s| {
        read_request(&mut s).unwrap();
        s.write_all(b"\x02\x00\x00\x00garbage").unwrap();
    });
    assert!(matches!(c.read(TxId::NONE, "/x").unwrap_err(), ClientError::Disconnected { .. }));
}

mod tempdir {
    /// A temporary directory removed on drop.
    pub struct Dir {
        pub path: std::path::PathBuf,
    }

    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = std::env::temp_dir().join(format!("xs-client-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
