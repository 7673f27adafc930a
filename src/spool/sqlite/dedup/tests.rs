use super::*;
use std::path::Path;

fn key(i: u64) -> u128 {
    crate::spool::sqlite::keys::dedup_key("s", &format!("m-{i}"))
}

fn open(dir: &Path, flush_ids: usize) -> (Connection, DedupIndex) {
    let conn = Connection::open(dir.join("spool.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    let index = DedupIndex::open(
        &conn,
        dir.join("dedup"),
        Tuning {
            flush_ids,
            max_memtable: flush_ids * 4,
        },
    )
    .unwrap();
    (conn, index)
}

/// Records `keys` (seen at `seen`) in one committed transaction.
fn record(conn: &Connection, index: &mut DedupIndex, keys: &[u128], seen: i64) {
    conn.execute_batch("BEGIN").unwrap();
    keys.iter().for_each(|k| index.remember(*k, seen));
    index.write_log(conn).unwrap();
    conn.execute_batch("COMMIT").unwrap();
    index.commit();
}

/// Lets the background jobs run until none is left to start.
fn settle(conn: &Connection, index: &mut DedupIndex, cutoff: i64) {
    for _ in 0..2_000 {
        index.maintain(conn, cutoff);
        if !index.busy() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("dedup jobs did not finish");
}

fn run_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("dedup")).unwrap().count()
}

fn live_runs(conn: &Connection) -> usize {
    conn.query_row("SELECT count(*) FROM dedup_runs", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as usize
}

#[test]
fn a_rolled_back_record_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut index) = open(dir.path(), 100);
    record(&conn, &mut index, &[key(1)], 10);
    conn.execute_batch("BEGIN").unwrap();
    index.remember(key(1), 50);
    index.remember(key(2), 50);
    index.write_log(&conn).unwrap();
    assert!(index.is_repeat(key(2), 0).unwrap());
    conn.execute_batch("ROLLBACK").unwrap();
    index.rollback();
    assert!(!index.is_repeat(key(2), 0).unwrap());
    // The earlier sighting is back as it was.
    assert!(index.is_repeat(key(1), 10).unwrap());
    assert!(!index.is_repeat(key(1), 11).unwrap());
    drop(index);
    let (_conn, index) = open(dir.path(), 100);
    assert!(index.is_repeat(key(1), 10).unwrap());
    assert!(!index.is_repeat(key(2), 0).unwrap());
}

#[test]
fn flushed_and_merged_ids_stay_repeats_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut index) = open(dir.path(), 100);
    for round in 0..30u64 {
        let keys: Vec<u128> = (round * 100..round * 100 + 100).map(key).collect();
        record(&conn, &mut index, &keys, 1_000 + round as i64);
        settle(&conn, &mut index, 0);
    }
    // 30 flushes of 100 ids, merged four at a time as size classes fill.
    assert!(index.runs() < 10, "{} runs", index.runs());
    assert_eq!(index.ids(), 3_000);
    assert_eq!(run_files(dir.path()), live_runs(&conn));
    let logged: i64 = conn
        .query_row("SELECT count(*) FROM dedup_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(logged, 0, "every flushed log row is gone");
    for i in 0..3_000 {
        assert!(index.is_repeat(key(i), 0).unwrap(), "id {i}");
    }
    for i in 3_000..6_000 {
        assert!(!index.is_repeat(key(i), 0).unwrap(), "id {i}");
    }
    drop(index);
    let (conn, index) = open(dir.path(), 100);
    assert_eq!(index.ids(), 3_000);
    assert_eq!(run_files(dir.path()), live_runs(&conn));
    assert!((0..3_000).all(|i| index.is_repeat(key(i), 0).unwrap()));
    // Seen at 1,000 + round: the window decides per id, not per run.
    assert!(!index.is_repeat(key(0), 1_001).unwrap());
    assert!(index.is_repeat(key(2_999), 1_029).unwrap());
}

#[test]
fn memtable_ids_survive_a_reopen_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut index) = open(dir.path(), 1_000);
    record(&conn, &mut index, &[key(1), key(2)], 5);
    record(&conn, &mut index, &[key(2)], 7);
    drop(index);
    let (_conn, index) = open(dir.path(), 1_000);
    assert!(index.is_repeat(key(1), 5).unwrap());
    assert!(index.is_repeat(key(2), 7).unwrap());
    assert_eq!(index.runs(), 0);
}

#[test]
fn expired_runs_are_deleted_and_merges_drop_expired_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut index) = open(dir.path(), 10);
    let old: Vec<u128> = (0..10).map(key).collect();
    record(&conn, &mut index, &old, 100);
    settle(&conn, &mut index, 0);
    assert_eq!(index.runs(), 1);
    let new: Vec<u128> = (10..20).map(key).collect();
    record(&conn, &mut index, &new, 500);
    settle(&conn, &mut index, 0);
    assert_eq!(index.runs(), 2);
    index.prune(&conn, 200).unwrap();
    assert_eq!(index.runs(), 1);
    assert_eq!(run_files(dir.path()), 1);
    assert!(!index.is_repeat(key(0), 0).unwrap());
    assert!(index.is_repeat(key(10), 200).unwrap());
    // Four runs of one size class merge; ids seen before the cutoff are left out.
    for round in 0..3u64 {
        let keys: Vec<u128> = (100 + round * 10..110 + round * 10).map(key).collect();
        record(&conn, &mut index, &keys, 1_000);
        settle(&conn, &mut index, 600);
    }
    assert_eq!(index.runs(), 1);
    assert_eq!(index.ids(), 30);
    assert!(!index.is_repeat(key(10), 0).unwrap());
    assert!(index.is_repeat(key(100), 1_000).unwrap());
}

#[test]
fn orphan_files_are_deleted_and_missing_runs_forgotten_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut index) = open(dir.path(), 10);
    let keys: Vec<u128> = (0..10).map(key).collect();
    record(&conn, &mut index, &keys, 1);
    settle(&conn, &mut index, 0);
    drop(index);
    let orphan = dir.path().join("dedup").join(run::file_name(999));
    std::fs::write(&orphan, b"half a run").unwrap();
    let (conn, index) = open(dir.path(), 10);
    assert!(!orphan.exists());
    assert!(index.is_repeat(key(3), 0).unwrap());
    drop(index);
    for entry in std::fs::read_dir(dir.path().join("dedup")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let (conn2, mut index) = open(dir.path(), 10);
    assert_eq!(index.runs(), 0);
    assert_eq!(live_runs(&conn2), 0);
    assert!(!index.is_repeat(key(3), 0).unwrap());
    // New runs never reuse the id of a forgotten one's file.
    record(&conn2, &mut index, &keys, 2);
    settle(&conn2, &mut index, 0);
    assert_eq!(index.runs(), 1);
    drop(conn);
}
