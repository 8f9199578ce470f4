//! A timer wheel of fixed ticks (a few milliseconds): the scheduler's
//! deadlines (next probes, timeouts of half-open probes). A deadline is
//! appended to the list of its tick; the deadlines that have passed come out
//! in one sweep of the ticks since the last one. A probe costs no heap
//! operation (with 5,000 reals, a binary heap of deadlines, cold in the cache
//! between two wake-ups, cost about a microsecond per pop), and the deadlines
//! of one tick are all served by one wake-up.

use std::time::Duration;

use tokio::time::Instant;

/// Ticks in one turn of the wheel: a deadline less than this many ticks
/// ahead is the only kind in its tick's list; one further ahead shares the
/// list with nearer ones and stays there until its turn.
const SLOTS: u64 = 4096;

/// How a deadline becomes a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// To the start of its tick: due up to a tick early (a next probe).
    Down,
    /// To the start of the next tick: never early, up to a tick late (a
    /// timeout).
    Up,
}

/// Items due at ticks counted from an origin.
pub struct Wheel<T> {
    origin: Instant,
    /// The length of a tick, in nanoseconds (not zero).
    tick_ns: u128,
    /// The next tick to sweep: every item of an earlier tick has come out.
    next: u64,
    /// The items of tick `t` (with their tick) are in `slots[t % SLOTS]`.
    slots: Vec<Vec<(u64, T)>>,
    len: usize,
    /// The earliest tick holding an item, when known.
    earliest: Option<u64>,
}

impl<T> Wheel<T> {
    /// An empty wheel of ticks of `tick` whose tick 0 starts at `origin`.
    ///
    /// # Panics
    /// If `tick` is zero (its one caller passes the scheduler's constant tick).
    pub fn new(origin: Instant, tick: Duration) -> Self {
        assert!(
            !tick.is_zero(),
            "a timer wheel needs a tick longer than zero"
        );
        Self {
            origin,
            tick_ns: tick.as_nanos(),
            next: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
            earliest: None,
        }
    }

    /// Items in the wheel.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn tick(&self, at: Instant, round: Round) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        let ticks = u64::try_from(since / self.tick_ns).unwrap_or(u64::MAX);
        match round {
            Round::Up if !since.is_multiple_of(self.tick_ns) => ticks.saturating_add(1),
            _ => ticks,
        }
    }

    fn at(&self, tick: u64) -> Instant {
        let ns = self.tick_ns.saturating_mul(u128::from(tick));
        self.origin + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn slot(tick: u64) -> usize {
        // The remainder is below SLOTS.
        (tick % SLOTS) as usize
    }

    /// Adds `item`, due at `at` rounded as `round` says (a deadline already
    /// past is due at the next sweep).
    pub fn insert(&mut self, at: Instant, round: Round, item: T) {
        let tick = self.tick(at, round).max(self.next);
        self.slots[Self::slot(tick)].push((tick, item));
        self.len += 1;
        self.earliest = Some(self.earliest.map_or(tick, |e| e.min(tick)));
    }

    /// Moves every item due by `now` into `out`, tick by tick.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        let last = self.tick(now, Round::Down);
        if self.earliest.is_none_or(|e| e > last) {
            return;
        }
        // After a whole turn every slot has been looked at once.
        let end = last.min(self.next.saturating_add(SLOTS - 1));
        while self.next <= end {
            let slot = &mut self.slots[Self::slot(self.next)];
            let mut i = 0;
            while i < slot.len() {
                if slot[i].0 <= last {
                    out.push(slot.swap_remove(i).1);
                    self.len -= 1;
                } else {
                    i += 1;
                }
            }
            self.next += 1;
        }
        self.next = last + 1;
        self.earliest = self.find_earliest();
    }

    /// The earliest tick holding an item: the first non-empty slot within a
    /// turn, else (every item a turn or more away) the least of all.
    fn find_earliest(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        for tick in self.next..self.next + SLOTS {
            // Items here are of this tick or of later turns.
            let found = self.slots[Self::slot(tick)].iter().any(|(t, _)| *t == tick);
            if found {
                return Some(tick);
            }
        }
        self.slots.iter().flatten().map(|(t, _)| *t).min()
    }

    /// When the earliest item is due (the start of its tick).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.earliest.map(|t| self.at(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn expired(w: &mut Wheel<u32>, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        w.expire(now, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn items_come_out_once_at_their_millisecond_rounded_as_asked() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, ms(1));
        w.insert(t0 + us(300), Round::Down, 1);
        w.insert(t0 + us(1700), Round::Down, 2);
        w.insert(t0 + us(1700), Round::Up, 3);
        w.insert(t0 + ms(2), Round::Up, 4);
        // Beyond one turn: shares a slot with tick 3 and must not come out with it.
        w.insert(t0 + ms(SLOTS + 3), Round::Down, 5);
        assert_eq!(w.len(), 5);
        assert_eq!(w.next_deadline(), Some(t0));
        assert_eq!(expired(&mut w, t0 + us(999)), [1]);
        assert_eq!(w.next_deadline(), Some(t0 + ms(1)));
        assert_eq!(
            expired(&mut w, t0 + us(1999)),
            [2],
            "a timeout came out early"
        );
        assert_eq!(expired(&mut w, t0 + ms(2)), [3, 4]);
        assert_eq!(expired(&mut w, t0 + ms(2)), [] as [u32; 0], "twice");
        assert_eq!(w.next_deadline(), Some(t0 + ms(SLOTS + 3)));
        assert_eq!(
            expired(&mut w, t0 + ms(3)),
            [] as [u32; 0],
            "a later turn's item"
        );
        assert_eq!(expired(&mut w, t0 + ms(SLOTS + 3)), [5]);
        assert_eq!((w.len(), w.next_deadline()), (0, None));
    }

    #[test]
    #[should_panic(expected = "a timer wheel needs a tick longer than zero")]
    fn a_zero_tick_is_refused() {
        let _ = Wheel::<u32>::new(Instant::now(), Duration::ZERO);
    }

    #[test]
    fn a_late_sweep_catches_up_and_a_past_deadline_is_due_at_once() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, ms(1));
        for i in 0..20_000u32 {
            w.insert(t0 + ms(u64::from(i)), Round::Down, i);
        }
        // Ten seconds late: everything due comes out, nothing later.
        let out = expired(&mut w, t0 + ms(9_999));
        assert_eq!(out, (0..10_000).collect::<Vec<_>>());
        assert_eq!(w.next_deadline(), Some(t0 + ms(10_000)));
        // An item already late goes to the next sweep.
        w.insert(t0, Round::Up, 99_999);
        assert_eq!(w.next_deadline(), Some(t0 + ms(10_000)));
        assert_eq!(expired(&mut w, t0 + ms(10_000)), [10_000, 99_999]);
        assert_eq!(w.len(), 9_999);
    }
}
