//! The one place threads are spawned: named, with panics caught and handed
//! to a callback (which turns them into a device failure or a log line).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crate::error::Error;

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

/// Spawns `f` on a thread called `name`. If `f` panics, `on_panic` gets the
/// message and the join handle yields `None`.
pub fn spawn_named<T: Send + 'static>(
    name: impl Into<String>,
    on_panic: impl FnOnce(String) + Send + 'static,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<Option<T>>, Error> {
    let name = name.into();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || match catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => Some(v),
            Err(payload) => {
                on_panic(panic_message(&*payload));
                None
            }
        })
        .map_err(|source| Error::Spawn { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_is_reported_and_thread_is_named() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let h = spawn_named(
            "test-panicker",
            move |msg| tx.send(msg).unwrap(),
            || {
                assert_eq!(std::thread::current().name(), Some("test-panicker"));
                panic!("boom {}", 7);
            },
        )
        .unwrap();
        let joined: Option<()> = h.join().unwrap();
        assert!(joined.is_none());
        assert_eq!(rx.recv().unwrap(), "boom 7");
    }

    #[test]
    fn value_is_returned_without_panic() {
        let h = spawn_named("test-ok", |_| unreachable!(), || 5).unwrap();
        assert_eq!(h.join().unwrap(), Some(5));
    }
}
