use super::*;

fn t0() -> Instant {
    Instant::now()
}

fn n(ptr: u64, event: Event, version: Version) -> Notification {
    Notification::new(
        ConnId(0),
        ptr as u32,
        event,
        Pointer::new(ptr).unwrap(),
        version,
    )
}

/// A data change of `bytes` at `offset` leaving the record `size` bytes long, from
/// `version - 1`.
fn w(ptr: u64, version: Version, offset: u64, bytes: &'static [u8], size: u64) -> Notification {
    Notification {
        delta: Some(Delta {
            base: version - 1,
            size,
            ranges: vec![(offset, Bytes::from_static(bytes))],
        }),
        ..n(ptr, Event::Changed, version)
    }
}

fn drain_at(q: &mut NotifyQueue, now: Instant) -> Vec<(u64, Event, Version)> {
    std::iter::from_fn(|| q.pop(now))
        .map(|n| (n.ptr.get(), n.event, n.version))
        .collect()
}

fn drain(q: &mut NotifyQueue) -> Vec<(u64, Event, Version)> {
    drain_at(q, t0())
}

fn data_watch(q: &mut NotifyQueue, ptr: u64, ms: u64) {
    q.configure(
        Pointer::new(ptr).unwrap(),
        ptr as u32,
        WatchConfig {
            data: true,
            min_interval: Duration::from_millis(ms),
        },
    );
}

#[test]
fn a_watcher_that_keeps_up_gets_every_notification_in_order() {
    let mut q = NotifyQueue::new(4, 1 << 20);
    for v in 2..6 {
        assert_eq!(q.push(n(1, Event::Changed, v), t0()), Pushed::Queued);
    }
    assert_eq!(
        drain(&mut q),
        (2..6).map(|v| (1, Event::Changed, v)).collect::<Vec<_>>()
    );
    assert!(q.is_empty());
    assert_eq!(q.merged(), 0);
}

#[test]
fn past_the_limit_each_watch_is_summarised_with_bounded_memory() {
    let mut q = NotifyQueue::new(2, 1 << 20);
    let now = t0();
    q.push(n(1, Event::Changed, 2), now);
    q.push(n(1, Event::Changed, 3), now);
    for v in 4..100_000 {
        q.push(n(1, Event::Changed, v), now);
        q.push(n(7, Event::Changed, v), now);
    }
    q.push(n(1, Event::AccessChanged, 99_999), now);
    q.push(n(1, Event::OwnerChanged, 99_999), now);
    assert_eq!(q.len(), 4, "2 exact + one summary per watch");
    assert_eq!(
        drain(&mut q),
        vec![
            (1, Event::Changed, 2),
            (1, Event::Changed, 3),
            (1, Event::OwnerChanged, 99_999),
            (1, Event::AccessChanged, 99_999),
            (1, Event::Changed, 99_999),
            (7, Event::Changed, 99_999),
        ]
    );
    assert_eq!(q.merged(), 2 * 99_996 + 2);
    // Caught up: exact again.
    assert_eq!(q.push(n(1, Event::Changed, 100_000), now), Pushed::Queued);
}

#[test]
fn a_deletion_is_never_merged_away() {
    let mut q = NotifyQueue::new(1, 1 << 20);
    q.push(n(5, Event::Changed, 2), t0());
    q.push(n(1, Event::Changed, 2), t0());
    q.push(n(1, Event::Deleted, 2), t0());
    assert_eq!(
        drain(&mut q),
        vec![(5, Event::Changed, 2), (1, Event::Deleted, 2)]
    );
}

#[test]
fn a_watch_with_a_summary_keeps_its_order() {
    let mut q = NotifyQueue::new(1, 1 << 20);
    q.push(n(9, Event::Changed, 1), t0());
    q.push(n(1, Event::Changed, 2), t0()); // summary for 1
    assert_eq!(q.pop(t0()).unwrap().ptr.get(), 9);
    // Room again, but watch 1 has a summary: this merges instead of overtaking it.
    assert_eq!(q.push(n(1, Event::Changed, 3), t0()), Pushed::Merged);
    assert_eq!(drain(&mut q), vec![(1, Event::Changed, 3)]);
}

/// Applies what the queue gives for watch 1 to `copy` (held at `version`).
fn apply(q: &mut NotifyQueue, now: Instant, copy: &mut Vec<u8>, version: &mut Version) {
    while let Some(n) = q.pop(now) {
        if n.event != Event::Changed || n.ptr.get() != 1 {
            continue;
        }
        let d = n.delta.expect("a data watch's change carries its bytes");
        assert_eq!(d.base, *version, "the delta applies to the copy's version");
        d.apply_to(copy);
        *version = n.version;
    }
}

#[test]
fn merged_data_changes_give_the_same_bytes_as_every_change() {
    let mut q = NotifyQueue::new(1, 1 << 20);
    data_watch(&mut q, 1, 0);
    let now = t0();
    // The record: "hello world" at version 1.
    let mut copy = b"hello world".to_vec();
    let mut version = 1;
    q.push(n(3, Event::Changed, 9), now); // fills the exact queue
    q.push(w(1, 2, 6, b"W", 11), now); // hello World
    q.push(w(1, 3, 11, b"!!", 13), now); // hello World!!
    q.push(w(1, 4, 0, b"HE", 13), now); // HEllo World!!
    q.push(n(1, Event::OwnerChanged, 4), now);
    q.push(w(1, 5, 1, b"ey", 13), now); // Heylo World!!
    assert_eq!(q.len(), 2);
    apply(&mut q, now, &mut copy, &mut version);
    assert_eq!(copy, b"Heylo World!!");
    assert_eq!(version, 5);
    assert_eq!(q.held_bytes(), 0);
}

#[test]
fn a_replace_that_shrinks_drops_what_lies_past_it() {
    let mut q = NotifyQueue::new(1, 1 << 20);
    data_watch(&mut q, 1, 0);
    let now = t0();
    let mut copy = b"0123456789".to_vec();
    let mut version = 1;
    q.push(n(3, Event::Changed, 9), now);
    q.push(w(1, 2, 8, b"ab", 10), now);
    q.push(w(1, 3, 0, b"xyz", 3), now); // REPLACE with 3 bytes
    q.push(w(1, 4, 3, b"Q", 4), now); // append
    apply(&mut q, now, &mut copy, &mut version);
    assert_eq!(copy, b"xyzQ");
}

#[test]
fn a_rate_limited_watch_gets_at_most_one_notification_per_interval() {
    let mut q = NotifyQueue::new(1000, 1 << 20);
    data_watch(&mut q, 1, 50);
    let start = t0();
    let mut copy = vec![0u8; 8];
    let mut version = 1;
    // The first change goes at once; the next ones wait for the interval.
    assert_eq!(q.push(w(1, 2, 0, b"a", 8), start), Pushed::Queued);
    apply(&mut q, start, &mut copy, &mut version);
    for (i, v) in (3..10).enumerate() {
        let at = start + Duration::from_millis(i as u64 * 5);
        assert_eq!(
            q.push(w(1, v, i as u64, b"b", 8), at),
            Pushed::Merged,
            "within the interval"
        );
        assert!(q.pop(at).is_none(), "nothing before the interval");
    }
    let due = q.next_due().expect("a summary waits for its time");
    assert_eq!(due, start + Duration::from_millis(50));
    assert!(!q.ready(due - Duration::from_millis(1)));
    assert!(q.ready(due));
    apply(&mut q, due, &mut copy, &mut version);
    assert_eq!(version, 9);
    assert_eq!(copy, b"bbbbbbb\0");
    // The next change after that waits for the next interval again.
    assert_eq!(q.push(w(1, 10, 7, b"c", 8), due), Pushed::Merged);
    assert_eq!(q.next_due(), Some(due + Duration::from_millis(50)));
}

#[test]
fn a_deletion_is_not_held_back_by_the_interval() {
    let mut q = NotifyQueue::new(1000, 1 << 20);
    data_watch(&mut q, 1, 1000);
    let now = t0();
    q.push(w(1, 2, 0, b"a", 1), now);
    q.push(w(1, 3, 0, b"b", 1), now);
    q.push(n(1, Event::Deleted, 3), now);
    assert_eq!(
        drain_at(&mut q, now),
        vec![(1, Event::Changed, 2), (1, Event::Deleted, 3)]
    );
}

#[test]
fn a_gap_or_too_many_ranges_or_the_byte_budget_gives_a_change_without_bytes() {
    let now = t0();
    // A gap in the versions.
    let mut q = NotifyQueue::new(1, 1 << 20);
    data_watch(&mut q, 1, 0);
    q.push(n(3, Event::Changed, 9), now);
    q.push(w(1, 2, 0, b"a", 1), now);
    q.push(w(1, 4, 0, b"b", 1), now);
    q.pop(now);
    let m = q.pop(now).unwrap();
    assert_eq!((m.event, m.version, m.delta), (Event::Changed, 4, None));

    // Too many separate ranges.
    let mut q = NotifyQueue::new(1, 1 << 20);
    data_watch(&mut q, 1, 0);
    q.push(n(3, Event::Changed, 9), now);
    for i in 0..=MAX_MERGED_RANGES as u64 {
        q.push(w(1, i + 2, i * 2, b"x", 4096), now);
    }
    q.pop(now);
    assert_eq!(q.pop(now).unwrap().delta, None);
    assert_eq!(q.held_bytes(), 0);

    // Over the byte budget: 8 bytes exact at most.
    let mut q = NotifyQueue::new(100, 8);
    data_watch(&mut q, 1, 0);
    assert_eq!(q.push(w(1, 2, 0, b"12345678", 8), now), Pushed::Queued);
    assert_eq!(q.push(w(1, 3, 0, b"x", 8), now), Pushed::Merged);
    assert!(q.held_bytes() <= 8);
    q.pop(now);
    q.push(w(1, 4, 1, b"yyyyyyyy", 9), now); // merged; the summary would exceed 8
    let m = q.pop(now).unwrap();
    assert_eq!((m.version, m.delta), (4, None));
}

/// A summary becomes several notifications; a change that arrives while they are being
/// sent must not overtake the rest of them (found by the `watch_sync` fuzz target's
/// model: the newer delta came first and the older one after it).
#[test]
fn a_summary_being_sent_is_not_overtaken_by_a_newer_change() {
    let mut q = NotifyQueue::new(1, 1 << 20);
    data_watch(&mut q, 1, 0);
    q.push(n(9, Event::Changed, 2), t0()); // fills the exact queue
    q.push(n(1, Event::OwnerChanged, 5), t0());
    q.push(w(1, 6, 0, b"a", 4), t0());
    assert_eq!(q.pop(t0()).unwrap().ptr.get(), 9);
    // The summary of watch 1: owner changed, then changed (v6).
    assert_eq!(q.pop(t0()).unwrap().event, Event::OwnerChanged);
    // A new change now has room in the exact queue …
    assert_eq!(q.push(w(1, 7, 1, b"b", 4), t0()), Pushed::Queued);
    // … but the summary's "changed" (v6) goes first.
    let next = q.pop(t0()).unwrap();
    assert_eq!((next.event, next.version), (Event::Changed, 6));
    let last = q.pop(t0()).unwrap();
    assert_eq!((last.version, last.delta.unwrap().base), (7, 6));
    assert!(q.pop(t0()).is_none());
}

/// A rate-limited summary that has become due waits in the send order; a deletion
/// merged into it then must not queue it a second time (found by the `watch_sync`
/// fuzz target: the second turn found no summary and panicked).
#[test]
fn a_deletion_merged_into_a_due_summary_sends_it_once() {
    let start = t0();
    let mut q = NotifyQueue::new(8, 1 << 20);
    data_watch(&mut q, 1, 50);
    data_watch(&mut q, 2, 50);
    // The first change of each is sent at once; the next ones wait for the interval.
    q.push(w(1, 2, 0, b"a", 4), start);
    q.push(w(2, 2, 0, b"a", 4), start);
    assert_eq!(drain_at(&mut q, start).len(), 2);
    q.push(w(1, 3, 0, b"b", 4), start);
    q.push(w(2, 3, 0, b"b", 4), start);
    // Both are due: one is sent, the other waits its turn …
    let later = start + Duration::from_millis(50);
    let sent = q.pop(later).unwrap().ptr.get();
    // … when its record is deleted.
    let gone = 3 - sent;
    q.push(n(gone, Event::Deleted, 3), later);
    assert_eq!(drain_at(&mut q, later), vec![(gone, Event::Deleted, 3)]);
    assert!(q.is_empty());
}
