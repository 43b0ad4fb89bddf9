//! The xenstore client against hostile or silent servers.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use xs_wire::client::{Client, ClientError, TxId};
use xs_wire::{Message, MsgType};

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
