//! The loss/order/ack-safety checker, modelled on how Kafka's system tests and
//! Jepsen check Kafka: the writer logs what it committed (in commit order),
//! what it rolled back, and what has an unknown outcome; the checker compares
//! that with a full read of the topics and with what Kafka held at each kill.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// One outbox event the writer inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenEvent {
    /// Event id (the `id` header).
    pub id: String,
    /// Aggregate id (the record key).
    pub key: String,
}

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// COMMIT returned successfully.
    Committed,
    /// The writer rolled it back.
    RolledBack,
    /// The connection failed during COMMIT: either.
    Unknown,
}

/// One transaction of the writer, in the order the writer committed them
/// (a single writer connection: commit order).
#[derive(Debug, Clone)]
pub struct WrittenTxn {
    /// Its events in insert order.
    pub events: Vec<WrittenEvent>,
    /// Its outcome.
    pub outcome: Outcome,
    /// The commit record's end LSN, when known (from an auditor slot).
    pub end_lsn: Option<u64>,
}

/// What the test saw right after killing walcast.
#[derive(Debug, Clone)]
pub struct KillObservation {
    /// The slot's `confirmed_flush_lsn` after the kill.
    pub confirmed_lsn: u64,
    /// Event ids Kafka held at that moment (read to the high watermarks).
    pub ids_in_kafka: HashSet<String>,
}

/// One record read from Kafka, in partition offset order.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Event id header.
    pub id: String,
    /// Record key.
    pub key: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// The verdict.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Committed events.
    pub committed: usize,
    /// Records read.
    pub observed: usize,
    /// Committed events not in Kafka.
    pub lost: Vec<String>,
    /// Events of rolled-back transactions in Kafka (or ids nobody wrote).
    pub phantom: Vec<String>,
    /// First occurrences out of commit order for their key.
    pub order_violations: Vec<String>,
    /// Records that repeat an event already read.
    pub duplicates: usize,
    /// Duplicates that are not a replayed suffix (a replay that skips).
    pub duplicates_not_suffix: Vec<String>,
    /// Transactions at or below a confirmed LSN that were not in Kafka at that kill.
    pub ack_safety: Vec<String>,
    /// Transactions (summed over the kills) above the confirmed LSN whose
    /// events were all in Kafka at the kill: delivered, confirmation still
    /// pending. Zero over many kills means the kills never hit the window
    /// the ack-safety check is about (a test that proves nothing).
    pub delivered_unconfirmed_at_kills: usize,
    /// Keys whose records are spread over more than one partition.
    pub split_keys: Vec<String>,
    /// Distinct events found in the dead-letter topic
    /// ([`check_with_dead_letters`]).
    pub dead_lettered: usize,
}

/// [`check`] under the dead-letter policy: the events in `dead` must be in
/// the dead-letter topic (`dead_letters`, by their `id` header) and nowhere
/// else; every other committed event must be in `observed`, per key in
/// commit order. A dead-lettered event counts as delivered (to the
/// dead-letter topic); one missing from it is lost; a record in the
/// dead-letter topic that was not expected there is a phantom (an event
/// silently diverted), and so is an expected dead letter found in `observed`.
pub fn check_with_dead_letters(
    txns: &[WrittenTxn],
    observed: &[Observed],
    dead: &HashSet<String>,
    dead_letters: &[Observed],
    kills: &[KillObservation],
) -> Report {
    let main: Vec<WrittenTxn> = txns
        .iter()
        .map(|t| WrittenTxn {
            events: t
                .events
                .iter()
                .filter(|e| !dead.contains(&e.id))
                .cloned()
                .collect(),
            outcome: t.outcome,
            end_lsn: t.end_lsn,
        })
        .collect();
    let mut report = check(&main, observed, kills);
    let committed_dead: Vec<&WrittenEvent> = txns
        .iter()
        .filter(|t| t.outcome == Outcome::Committed)
        .flat_map(|t| t.events.iter())
        .filter(|e| dead.contains(&e.id))
        .collect();
    let in_dlq: HashSet<&str> = dead_letters.iter().map(|o| o.id.as_str()).collect();
    for e in &committed_dead {
        report.committed += 1;
        if !in_dlq.contains(e.id.as_str()) {
            report
                .lost
                .push(format!("{} (expected in the dead-letter topic)", e.id));
        }
    }
    let mut seen = HashSet::new();
    for o in dead_letters {
        report.observed += 1;
        if !seen.insert(o.id.as_str()) {
            report.duplicates += 1;
        } else if !dead.contains(&o.id) {
            report
                .phantom
                .push(format!("{} (dead-lettered, but it was publishable)", o.id));
        }
    }
    report.dead_lettered = in_dlq.len();
    report
}

impl Report {
    /// No loss, no phantom, no reordering, duplicates only as replayed suffixes,
    /// no ack-safety violation.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.phantom.is_empty()
            && self.order_violations.is_empty()
            && self.duplicates_not_suffix.is_empty()
            && self.ack_safety.is_empty()
            && self.split_keys.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = |v: &Vec<String>| v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        write!(
            f,
            "committed={} observed={} lost={} phantom={} reordered={} duplicates={} (not a replayed suffix: {}) ack_safety={} split_keys={} dead_lettered={}",
            self.committed,
            self.observed,
            self.lost.len(),
            self.phantom.len(),
            self.order_violations.len(),
            self.duplicates,
            self.duplicates_not_suffix.len(),
            self.ack_safety.len(),
            self.split_keys.len(),
            self.dead_lettered
        )?;
        for (name, v) in [
            ("lost", &self.lost),
            ("phantom", &self.phantom),
            ("reordered", &self.order_violations),
            ("bad duplicates", &self.duplicates_not_suffix),
            ("ack safety", &self.ack_safety),
            ("split keys", &self.split_keys),
        ] {
            if !v.is_empty() {
                write!(f, "\n  {name}: {}", first(v))?;
            }
        }
        Ok(())
    }
}

/// Compares the writer's log, the kills' observations and the final read.
pub fn check(txns: &[WrittenTxn], observed: &[Observed], kills: &[KillObservation]) -> Report {
    let mut report = Report {
        observed: observed.len(),
        ..Report::default()
    };
    // Per key: committed event ids in commit order; id -> (key, seq).
    let mut seq_of: HashMap<&str, (&str, usize)> = HashMap::new();
    let mut per_key_len: HashMap<&str, usize> = HashMap::new();
    let mut rolled_back: HashSet<&str> = HashSet::new();
    let mut unknown: HashSet<&str> = HashSet::new();
    for t in txns {
        for e in &t.events {
            match t.outcome {
                Outcome::Committed => {
                    let n = per_key_len.entry(&e.key).or_insert(0);
                    seq_of.insert(&e.id, (&e.key, *n));
                    *n += 1;
                    report.committed += 1;
                }
                Outcome::RolledBack => {
                    rolled_back.insert(&e.id);
                }
                Outcome::Unknown => {
                    unknown.insert(&e.id);
                }
            }
        }
    }

    // Loss and phantoms.
    let seen: HashSet<&str> = observed.iter().map(|o| o.id.as_str()).collect();
    for t in txns.iter().filter(|t| t.outcome == Outcome::Committed) {
        for e in &t.events {
            if !seen.contains(e.id.as_str()) {
                report.lost.push(e.id.clone());
            }
        }
    }
    let mut phantom_seen = HashSet::new();
    for o in observed {
        let id = o.id.as_str();
        if (rolled_back.contains(id) || (!seq_of.contains_key(id) && !unknown.contains(id)))
            && phantom_seen.insert(id)
        {
            report.phantom.push(o.id.clone());
        }
    }

    // Order and duplicates, per key in partition offset order.
    let mut by_key: HashMap<&str, Vec<&Observed>> = HashMap::new();
    for o in observed {
        by_key.entry(o.key.as_str()).or_default().push(o);
    }
    for (key, mut recs) in by_key {
        let parts: HashSet<i32> = recs.iter().map(|r| r.partition).collect();
        if parts.len() > 1 {
            report.split_keys.push(key.to_string());
        }
        recs.sort_by_key(|r| (r.partition, r.offset));
        let mut firsts_seen: HashSet<usize> = HashSet::new();
        let mut next_first = 0usize; // the seq the next first occurrence must have
        let mut prev: Option<usize> = None;
        for r in recs {
            let Some(&(_, seq)) = seq_of.get(r.id.as_str()) else {
                continue; // phantom or unknown outcome: reported above / allowed
            };
            let first = firsts_seen.insert(seq);
            if first {
                if seq != next_first {
                    report.order_violations.push(format!(
                        "key {key}: event {} (commit #{seq} of the key) arrived first where #{next_first} was due",
                        r.id
                    ));
                }
                next_first = next_first.max(seq + 1);
            } else {
                report.duplicates += 1;
                // A replay restarts at or before the previous record and then
                // continues in order; it never skips ahead.
                if let Some(p) = prev {
                    if seq > p + 1 {
                        report.duplicates_not_suffix.push(format!(
                            "key {key}: after commit #{p} came the repeated #{seq} ({}), skipping",
                            r.id
                        ));
                    }
                }
            }
            prev = Some(seq);
        }
    }

    // Ack safety.
    for (k, kill) in kills.iter().enumerate() {
        for (i, t) in txns.iter().enumerate() {
            if t.outcome != Outcome::Committed {
                continue;
            }
            let Some(end) = t.end_lsn else { continue };
            if end > kill.confirmed_lsn {
                if !t.events.is_empty()
                    && t.events.iter().all(|e| kill.ids_in_kafka.contains(&e.id))
                {
                    report.delivered_unconfirmed_at_kills += 1;
                }
            } else {
                if let Some(missing) = t.events.iter().find(|e| !kill.ids_in_kafka.contains(&e.id))
                {
                    report.ack_safety.push(format!(
                        "kill #{k}: transaction #{i} (end LSN {end:X}) is at or below the confirmed LSN {:X} but event {} was not in Kafka",
                        kill.confirmed_lsn, missing.id
                    ));
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(ids: &[(&str, &str)], outcome: Outcome, end: u64) -> WrittenTxn {
        WrittenTxn {
            events: ids
                .iter()
                .map(|(id, key)| WrittenEvent {
                    id: id.to_string(),
                    key: key.to_string(),
                })
                .collect(),
            outcome,
            end_lsn: Some(end),
        }
    }

    fn obs(seq: &[(&str, &str)]) -> Vec<Observed> {
        seq.iter()
            .enumerate()
            .map(|(i, (id, key))| Observed {
                id: id.to_string(),
                key: key.to_string(),
                partition: 0,
                offset: i as i64,
            })
            .collect()
    }

    fn log() -> Vec<WrittenTxn> {
        vec![
            txn(&[("a1", "a"), ("b1", "b")], Outcome::Committed, 100),
            txn(&[("x1", "a")], Outcome::RolledBack, 0),
            txn(&[("a2", "a")], Outcome::Committed, 200),
            txn(&[("a3", "a"), ("b2", "b")], Outcome::Committed, 300),
        ]
    }

    #[test]
    fn dead_letters_count_as_delivered_only_in_the_dead_letter_topic() {
        let dead: HashSet<String> = ["a2".to_string()].into();
        let main = obs(&[("a1", "a"), ("b1", "b"), ("a3", "a"), ("b2", "b")]);
        let r = check_with_dead_letters(&log(), &main, &dead, &obs(&[("a2", "a")]), &[]);
        assert!(
            r.is_clean() && r.dead_lettered == 1 && r.committed == 5,
            "{r}"
        );
        // Missing from the dead-letter topic: lost.
        let r = check_with_dead_letters(&log(), &main, &dead, &[], &[]);
        assert_eq!(r.lost.len(), 1, "{r}");
        // A publishable event in the dead-letter topic: diverted (phantom).
        let r =
            check_with_dead_letters(&log(), &main, &dead, &obs(&[("a2", "a"), ("b2", "b")]), &[]);
        assert_eq!(r.phantom.len(), 1, "{r}");
        // A dead-lettered event in its own topic too: phantom.
        let both = obs(&[
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("a3", "a"),
            ("b2", "b"),
        ]);
        let r = check_with_dead_letters(&log(), &both, &dead, &obs(&[("a2", "a")]), &[]);
        assert_eq!(r.phantom.len(), 1, "{r}");
        // The others keep their order.
        let swapped = obs(&[("a3", "a"), ("b1", "b"), ("a1", "a"), ("b2", "b")]);
        let r = check_with_dead_letters(&log(), &swapped, &dead, &obs(&[("a2", "a")]), &[]);
        assert!(!r.order_violations.is_empty(), "{r}");
    }

    #[test]
    fn a_clean_run_is_clean() {
        let r = check(
            &log(),
            &obs(&[
                ("a1", "a"),
                ("b1", "b"),
                ("a2", "a"),
                ("a3", "a"),
                ("b2", "b"),
            ]),
            &[],
        );
        assert!(r.is_clean(), "{r}");
        assert_eq!(r.committed, 5);
        assert_eq!(r.duplicates, 0);
    }

    #[test]
    fn catches_loss() {
        let r = check(
            &log(),
            &obs(&[("a1", "a"), ("b1", "b"), ("a3", "a"), ("b2", "b")]),
            &[],
        );
        assert_eq!(r.lost, vec!["a2".to_string()]);
        assert!(!r.is_clean());
    }

    #[test]
    fn catches_phantoms() {
        let r = check(
            &log(),
            &obs(&[
                ("a1", "a"),
                ("b1", "b"),
                ("x1", "a"),
                ("a2", "a"),
                ("a3", "a"),
                ("b2", "b"),
                ("zz", "b"),
            ]),
            &[],
        );
        assert_eq!(r.phantom, vec!["x1".to_string(), "zz".to_string()]);
    }

    #[test]
    fn catches_reordering() {
        let r = check(
            &log(),
            &obs(&[
                ("a1", "a"),
                ("b1", "b"),
                ("a3", "a"),
                ("a2", "a"),
                ("b2", "b"),
            ]),
            &[],
        );
        assert_eq!(r.order_violations.len(), 2, "{r}");
        assert!(!r.is_clean());
    }

    #[test]
    fn allows_a_replayed_suffix_and_counts_it() {
        let r = check(
            &log(),
            &obs(&[
                ("a1", "a"),
                ("a2", "a"),
                ("a1", "a"),
                ("a2", "a"),
                ("a3", "a"),
                ("b1", "b"),
                ("b2", "b"),
            ]),
            &[],
        );
        assert!(r.is_clean(), "{r}");
        assert_eq!(r.duplicates, 2);
    }

    #[test]
    fn catches_a_replay_that_skips() {
        // a1 a2 a3, then a replay of a1 that jumps to a3 (a2 missing from the replay).
        let r = check(
            &log(),
            &obs(&[
                ("a1", "a"),
                ("a2", "a"),
                ("a3", "a"),
                ("a1", "a"),
                ("a3", "a"),
                ("b1", "b"),
                ("b2", "b"),
            ]),
            &[],
        );
        assert_eq!(r.duplicates_not_suffix.len(), 1, "{r}");
        assert!(!r.is_clean());
    }

    #[test]
    fn catches_ack_safety_violations() {
        let mut in_kafka: HashSet<String> =
            ["a1", "b1", "a2"].iter().map(|s| s.to_string()).collect();
        let all = obs(&[
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("a3", "a"),
            ("b2", "b"),
        ]);
        // Confirmed 300 but transaction #3 (end 300) was not in Kafka at the kill.
        let r = check(
            &log(),
            &all,
            &[KillObservation {
                confirmed_lsn: 300,
                ids_in_kafka: in_kafka.clone(),
            }],
        );
        assert_eq!(r.ack_safety.len(), 1, "{r}");
        // Confirmed 200: fine.
        let r = check(
            &log(),
            &all,
            &[KillObservation {
                confirmed_lsn: 200,
                ids_in_kafka: in_kafka.clone(),
            }],
        );
        assert!(r.is_clean(), "{r}");
        // Transaction #3 (end 300: a3, b2) is not in Kafka; with both in Kafka
        // it counts as delivered but unconfirmed.
        assert_eq!(r.delivered_unconfirmed_at_kills, 0, "{r}");
        let mut more = in_kafka.clone();
        more.insert("a3".into());
        more.insert("b2".into());
        let r = check(
            &log(),
            &all,
            &[KillObservation {
                confirmed_lsn: 200,
                ids_in_kafka: more,
            }],
        );
        assert_eq!(r.delivered_unconfirmed_at_kills, 1, "{r}");
        // A transaction half in Kafka at or below the confirmed LSN is a violation too.
        in_kafka.remove("b1");
        let r = check(
            &log(),
            &all,
            &[KillObservation {
                confirmed_lsn: 100,
                ids_in_kafka: in_kafka,
            }],
        );
        assert_eq!(r.ack_safety.len(), 1, "{r}");
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_appear() {
        let mut l = log();
        l.insert(2, txn(&[("u1", "a"), ("u2", "c")], Outcome::Unknown, 0));
        let base = [
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("a3", "a"),
            ("b2", "b"),
        ];
        // Absent: not lost.
        let r = check(&l, &obs(&base), &[]);
        assert!(r.is_clean(), "{r}");
        // Present (it did commit): neither phantom nor out of order.
        let mut with = base.to_vec();
        with.insert(2, ("u1", "a"));
        with.push(("u2", "c"));
        let r = check(&l, &obs(&with), &[]);
        assert!(r.is_clean(), "{r}");
        assert_eq!(r.observed, 7);
        // An unknown transaction is never counted as committed.
        assert_eq!(r.committed, 5);
    }

    #[test]
    fn the_report_names_what_it_found() {
        let r = check(&log(), &obs(&[("a1", "a")]), &[]);
        let text = r.to_string();
        assert!(text.contains("lost=4"), "{text}");
        assert!(text.contains("lost: "), "the lost ids are named: {text}");
    }

    #[test]
    fn catches_split_keys() {
        let mut o = obs(&[
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("a3", "a"),
            ("b2", "b"),
        ]);
        o[2].partition = 1;
        let r = check(&log(), &o, &[]);
        assert_eq!(r.split_keys, vec!["a".to_string()]);
    }
}
