//! The simulated host behaves as Xen and Linux's devices do: every error path
//! with Xen's errno or `GNTST_*`, event delivery through pollable fds, and
//! guest memory shared between a frontend and a backend.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use evtchn::{EventChannel, Port};
use gnttab::{AccessError, CopySegment, GrantMapper, GrantRef, GrantStatus, GuestPage, PAGE_SIZE};
use nix::libc::{EINVAL, ENOTCONN, ESRCH};
use xen_sim::host::{Error, PortStatus, SimHost};

const BACK: u16 = 0;
const FRONT: u16 = 7;
const OTHER: u16 = 8;

fn host() -> Arc<SimHost> {
    let host = SimHost::new();
    for d in [BACK, FRONT, OTHER] {
        host.create_domain(d).unwrap();
    }
    host
}

/// Blocks until the handle's fd is readable, then takes its pending ports.
fn wait(ch: &dyn EventChannel) -> Vec<Port> {
    evtchn::wait_pending(ch, None).unwrap();
    let mut out = Vec::new();
    ch.take_pending(&mut out).unwrap();
    out
}

fn is_readable(ch: &dyn EventChannel) -> bool {
    evtchn::wait_pending(ch, Some(Duration::ZERO)).unwrap()
}

/// A connected pair: (frontend handle, its port, backend handle, its port),
/// with the bind-time event already taken and the backend port unmasked.
fn connected(host: &Arc<SimHost>) -> (Box<dyn EventChannel>, Port, Box<dyn EventChannel>, Port) {
    let front = host.evtchn(FRONT);
    let back = host.evtchn(BACK);
    let fport = front.bind_unbound_port(BACK).unwrap();
    let bport = back.bind_interdomain(FRONT, fport).unwrap();
    assert_eq!(wait(&*back), vec![bport]);
    back.unmask(bport).unwrap();
    (front, fport, back, bport)
}

fn map_status(mapper: &dyn GrantMapper, domid: u16, refs: &[GrantRef], writable: bool) -> GrantStatus {
    match mapper.map(domid, refs, writable) {
        Err(gnttab::Error::Map { status, .. }) => status,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => GrantStatus::Okay,
    }
}

#[test]
fn bind_to_a_port_offered_to_another_domain_fails_with_einval() {
    let host = host();
    let offered_to_other = host.evtchn(FRONT).bind_unbound_port(OTHER).unwrap();
    let err = host.evtchn(BACK).bind_interdomain(FRONT, offered_to_other).unwrap_err();
    assert_eq!(err.errno(), Some(EINVAL));
}

#[test]
fn bind_to_a_closed_or_never_allocated_port_fails_with_einval() {
    let host = host();
    let front = host.evtchn(FRONT);
    let back = host.evtchn(BACK);
    let port = front.bind_unbound_port(BACK).unwrap();
    front.unbind(port).unwrap();
    assert_eq!(back.bind_interdomain(FRONT, port).unwrap_err().errno(), Some(EINVAL));
    assert_eq!(back.bind_interdomain(FRONT, Port(1000)).unwrap_err().errno(), Some(EINVAL));
    assert_eq!(back.bind_interdomain(FRONT, Port(0)).unwrap_err().errno(), Some(EINVAL));
}

#[test]
fn bind_to_an_already_connected_port_fails_with_einval() {
    let host = host();
    let (_front, fport, _back, _bport) = connected(&host);
    assert_eq!(host.evtchn(BACK).bind_interdomain(FRONT, fport).unwrap_err().errno(), Some(EINVAL));
}

#[test]
fn bind_to_a_missing_domain_fails_with_esrch() {
    let host = host();
    assert_eq!(host.evtchn(BACK).bind_interdomain(99, Port(1)).unwrap_err().errno(), Some(ESRCH));
}

#[test]
fn notify_on_a_port_not_bound_on_the_handle_fails_with_enotconn() {
    let host = host();
    let back = host.evtchn(BACK);
    assert_eq!(back.notify(Port(1)).unwrap_err().errno(), Some(ENOTCONN));
    let (_front, _fport, _back2, bport) = connected(&host);
    assert_eq!(back.notify(bport).unwrap_err().errno(), Some(ENOTCONN));
}

#[test]
fn notify_on_an_unbound_port_is_dropped_as_xen_does() {
    let host = host();
    let front = host.evtchn(FRONT);
    let port = front.bind_unbound_port(BACK).unwrap();
    front.notify(port).unwrap();
    assert!(!is_readable(&*front));
    assert_eq!(host.port_status(FRONT, port), Some(PortStatus::Unbound { remote: BACK }));
}

#[test]
fn double_unbind_fails_with_enotconn_and_a_port_beyond_the_limit_with_einval() {
    let host = host();
    let (front, fport, back, bport) = connected(&host);
    back.unbind(bport).unwrap();
    assert_eq!(back.unbind(bport).unwrap_err().errno(), Some(ENOTCONN));
    assert_eq!(back.unbind(Port(1 << 20)).unwrap_err().errno(), Some(EINVAL));
    // The far end became unbound, offered to the closer's domain again.
    assert_eq!(host.port_status(FRONT, fport), Some(PortStatus::Unbound { remote: BACK }));
    front.notify(fport).unwrap();
    let again = back.bind_interdomain(FRONT, fport).unwrap();
    assert_eq!(wait(&*back), vec![again]);
}

#[test]
fn destroy_domain_closes_its_ports_and_unbinds_the_far_ends() {
    let host = host();
    let (front, fport, back, bport) = connected(&host);
    host.destroy_domain(FRONT);
    assert_eq!(host.port_status(BACK, bport), Some(PortStatus::Unbound { remote: FRONT }));
    assert_eq!(host.port_status(FRONT, fport), None);
    back.notify(bport).unwrap();
    assert_eq!(front.notify(fport).unwrap_err().errno(), Some(ESRCH));
    assert_eq!(back.bind_interdomain(FRONT, fport).unwrap_err().errno(), Some(ESRCH));
}

#[test]
fn destroy_domain_revokes_its_grants_but_keeps_live_mappings_valid() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(1).unwrap();
    let gref = gt.grant_access(pages.frame(0), BACK, false).unwrap();
    let mapper = host.grant_mapper(BACK);
    let mapping = mapper.map(FRONT, &[gref], true).unwrap();
    pages.mapping().write(0, b"before").unwrap();
    host.destroy_domain(FRONT);
    assert_eq!(map_status(&*mapper, FRONT, &[gref], false), GrantStatus::BadDomain);
    let mut buf = [0u8; 6];
    mapping.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"before");
    let mut status = [GrantStatus::Okay];
    let mut dst = [0u8; 8];
    let src = GuestPage { domid: FRONT, gref, offset: 0 };
    mapper.copy(&mut [CopySegment::FromGuest { src, dst: &mut dst }], &mut status).unwrap();
    assert_eq!(status, [GrantStatus::BadDomain]);
}

#[test]
fn map_of_an_ungranted_or_out_of_table_ref_fails_as_xen_does() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(1).unwrap();
    let gref = gt.grant_access(pages.frame(0), BACK, false).unwrap();
    let mapper = host.grant_mapper(BACK);
    assert_eq!(map_status(&*mapper, FRONT, &[GrantRef(gref.0 + 1)], false), GrantStatus::GeneralError);
    assert_eq!(map_status(&*mapper, FRONT, &[GrantRef(1 << 30)], false), GrantStatus::BadGntref);
    gt.end_access(gref).unwrap();
    assert_eq!(map_status(&*mapper, FRONT, &[gref], false), GrantStatus::GeneralError);
    assert_eq!(map_status(&*mapper, 99, &[gref], false), GrantStatus::BadDomain);
}

#[test]
fn map_of_a_ref_granted_to_another_domain_fails_and_pins_nothing() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(2).unwrap();
    let mine = gt.grant_access(pages.frame(0), BACK, false).unwrap();
    let theirs = gt.grant_access(pages.frame(1), OTHER, false).unwrap();
    let err = host.grant_mapper(BACK).map(FRONT, &[mine, theirs], false).unwrap_err();
    assert!(
        matches!(err, gnttab::Error::Map { domid: FRONT, gref, status: GrantStatus::GeneralError } if gref == theirs)
    );
    assert_eq!(gt.live_maps().unwrap(), 0);
    gt.end_access(mine).unwrap();
}

#[test]
fn read_write_map_of_a_read_only_grant_fails_and_a_read_only_map_cannot_write() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(1).unwrap();
    pages.mapping().write(100, b"ro").unwrap();
    let gref = gt.grant_access(pages.frame(0), BACK, true).unwrap();
    let mapper = host.grant_mapper(BACK);
    assert_eq!(map_status(&*mapper, FRONT, &[gref], true), GrantStatus::GeneralError);
    let ro = mapper.map(FRONT, &[gref], false).unwrap();
    assert!(!ro.is_writable());
    assert_eq!(ro.write(0, b"x"), Err(AccessError::ReadOnly));
    let mut buf = [0u8; 2];
    ro.read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"ro");
}

#[test]
fn copy_reports_per_segment_statuses_as_xen_does() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(2).unwrap();
    let ro = gt.grant_access(pages.frame(0), BACK, true).unwrap();
    let rw = gt.grant_access(pages.frame(1), BACK, false).unwrap();
    let theirs = gt.grant_access(pages.frame(1), OTHER, false).unwrap();
    let data = [0xabu8; 512];
    let mut out = [0u8; 512];
    let mut big = vec![0u8; 1024];
    let at = |gref, offset| GuestPage { domid: FRONT, gref, offset };
    let mut segs = [
        CopySegment::ToGuest { src: &data, dst: at(ro, 0) },
        CopySegment::ToGuest { src: &data, dst: at(rw, 3584) },
        CopySegment::FromGuest { src: at(theirs, 0), dst: &mut out },
        CopySegment::FromGuest { src: at(rw, 3584), dst: &mut big },
        CopySegment::FromGuest { src: at(GrantRef(1 << 30), 0), dst: &mut [0u8; 4] },
        CopySegment::FromGuest { src: GuestPage { domid: 99, gref: rw, offset: 0 }, dst: &mut [0u8; 4] },
        CopySegment::ToGuest { src: &[], dst: at(rw, 0) },
    ];
    let mut status = [GrantStatus::GeneralError; 7];
    host.grant_mapper(BACK).copy(&mut segs, &mut status).unwrap();
    assert_eq!(
        status,
        [
            GrantStatus::GeneralError,
            GrantStatus::Okay,
            GrantStatus::GeneralError,
            GrantStatus::BadCopyArg,
            GrantStatus::BadGntref,
            GrantStatus::BadDomain,
            GrantStatus::Okay,
        ]
    );
    let mut check = [0u8; 512];
    pages.mapping().read(PAGE_SIZE + 3584, &mut check).unwrap();
    assert_eq!(check, data);
    pages.mapping().read(0, &mut check).unwrap();
    assert_eq!(check, [0u8; 512]);
    assert_eq!(gt.live_maps().unwrap(), 0);
}

#[test]
fn end_access_fails_while_mapped_and_succeeds_after_unmap() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(1).unwrap();
    let gref = gt.grant_access(pages.frame(0), BACK, false).unwrap();
    let mapping = host.grant_mapper(BACK).map(FRONT, &[gref], true).unwrap();
    assert_eq!(gt.map_count(gref).unwrap(), Some(1));
    assert!(matches!(gt.end_access(gref), Err(Error::Busy(r)) if r == gref));
    drop(mapping);
    assert_eq!(gt.map_count(gref).unwrap(), Some(0));
    gt.end_access(gref).unwrap();
    assert!(matches!(gt.end_access(gref), Err(Error::NotGranted(_))));
}

#[test]
fn granting_an_unallocated_frame_fails() {
    let host = host();
    let gt = host.grant_table(FRONT);
    assert!(matches!(gt.grant_access(5u64, BACK, false), Err(Error::BadFrame { domid: FRONT, pfn: 5 })));
}

#[test]
fn multi_ref_map_is_one_contiguous_range_in_ref_order() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let a = gt.alloc_pages(2).unwrap();
    let b = gt.alloc_pages(1).unwrap();
    a.mapping().fill(0, PAGE_SIZE, 1).unwrap();
    a.mapping().fill(PAGE_SIZE, PAGE_SIZE, 2).unwrap();
    b.mapping().fill(0, PAGE_SIZE, 3).unwrap();
    let refs = [
        gt.grant_access(b.frame(0), BACK, false).unwrap(),
        gt.grant_access(a.frame(0), BACK, false).unwrap(),
        gt.grant_access(a.frame(1), BACK, false).unwrap(),
    ];
    let m = host.grant_mapper(BACK).map(FRONT, &refs, true).unwrap();
    assert_eq!(m.len(), 3 * PAGE_SIZE);
    let mut firsts = [0u8; 3];
    for (i, f) in firsts.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        m.read(i * PAGE_SIZE + PAGE_SIZE - 1, &mut b).unwrap();
        *f = b[0];
    }
    assert_eq!(firsts, [3, 1, 2]);
    assert_eq!(gt.live_maps().unwrap(), 3);
}

#[test]
fn grant_copy_round_trip_through_the_guest() {
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(2).unwrap();
    let pattern: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + i / 256) as u8).collect();
    pages.mapping().write(0, &pattern).unwrap();
    let src = gt.grant_access(pages.frame(0), BACK, true).unwrap();
    let dst = gt.grant_access(pages.frame(1), BACK, false).unwrap();
    let mapper = host.grant_mapper(BACK);
    let mut local = vec![0u8; PAGE_SIZE];
    let mut status = [GrantStatus::GeneralError; 2];
    let (lo, hi) = local.split_at_mut(PAGE_SIZE / 2);
    let mut from = [
        CopySegment::FromGuest { src: GuestPage { domid: FRONT, gref: src, offset: 0 }, dst: lo },
        CopySegment::FromGuest { src: GuestPage { domid: FRONT, gref: src, offset: (PAGE_SIZE / 2) as u16 }, dst: hi },
    ];
    mapper.copy(&mut from, &mut status).unwrap();
    assert_eq!(status, [GrantStatus::Okay; 2]);
    assert_eq!(local, pattern);
    let mut status = [GrantStatus::GeneralError];
    mapper
        .copy(
            &mut [CopySegment::ToGuest { src: &local, dst: GuestPage { domid: FRONT, gref: dst, offset: 0 } }],
            &mut status,
        )
        .unwrap();
    assert_eq!(status, [GrantStatus::Okay]);
    let mut back = vec![0u8; PAGE_SIZE];
    pages.mapping().read(PAGE_SIZE, &mut back).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn two_threads_ping_pong_through_polled_event_channels() {
    const ROUND_TRIPS: u32 = 2000;
    let host = host();
    let (front, fport, back, bport) = connected(&host);
    let server = std::thread::spawn(move || {
        let mut served = 0;
        while served < ROUND_TRIPS {
            for p in wait(&*back) {
                assert_eq!(p, bport);
                back.unmask(p).unwrap();
                back.notify(p).unwrap();
                served += 1;
            }
        }
        served
    });
    let mut replies = 0;
    for _ in 0..ROUND_TRIPS {
        front.notify(fport).unwrap();
        let fired = wait(&*front);
        assert_eq!(fired, vec![fport]);
        front.unmask(fport).unwrap();
        replies += 1;
    }
    assert_eq!(server.join().unwrap(), ROUND_TRIPS);
    assert_eq!(replies, ROUND_TRIPS);
}

#[test]
fn a_backend_mapping_and_the_guest_view_see_each_others_writes_across_threads() {
    const ROUNDS: u32 = 1000;
    let host = host();
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(1).unwrap();
    let gref = gt.grant_access(pages.frame(0), BACK, false).unwrap();
    let mapping = host.grant_mapper(BACK).map(FRONT, &[gref], true).unwrap();
    let (front, fport, back, bport) = connected(&host);
    // The guest writes a request word and a payload; the backend answers
    // with the request doubled and the payload reversed, through its mapping.
    let backend = std::thread::spawn(move || {
        for round in 1..=ROUNDS {
            loop {
                let fired = wait(&*back);
                back.unmask(bport).unwrap();
                if !fired.is_empty() && mapping.load_u32(0, Ordering::Acquire).unwrap() == round {
                    break;
                }
            }
            let mut payload = [0u8; 16];
            mapping.read(64, &mut payload).unwrap();
            payload.reverse();
            mapping.write(128, &payload).unwrap();
            mapping.store_u32(4, round * 2, Ordering::Release).unwrap();
            back.notify(bport).unwrap();
        }
    });
    let view = pages.mapping();
    for round in 1..=ROUNDS {
        let payload: [u8; 16] = std::array::from_fn(|i| (round as u8).wrapping_add(i as u8));
        view.write(64, &payload).unwrap();
        view.store_u32(0, round, Ordering::Release).unwrap();
        front.notify(fport).unwrap();
        while view.load_u32(4, Ordering::Acquire).unwrap() != round * 2 {
            wait(&*front);
            front.unmask(fport).unwrap();
        }
        let mut answer = [0u8; 16];
        view.read(128, &mut answer).unwrap();
        let mut expected = payload;
        expected.reverse();
        assert_eq!(answer, expected, "round {round}");
    }
    backend.join().unwrap();
}
