//! The manifests-directory source: watches every `*.yaml` / `*.yml` / `*.json` file of a directory
//! (Services and EndpointSlices) with inotify (through `notify`) and sends what changed.
//!
//! Why it is incremental: with 10k Services in 10k files, re-reading the directory on every change
//! would cost far more than the map update it triggers. An event re-reads only the files it names
//! and sends object-level Upsert/Delete events for their objects; the first scan is sent as one
//! `Resync` followed by `Synced`. A file that does not parse is sent as a problem, before the
//! events of the same scan.
//!
//! Why it keeps no objects: the agent's `ClusterState` holds every object already and ignores an
//! upsert equal to what it holds, so this source only remembers which keys each file defined (to
//! send deletes) — one copy of the cluster in memory instead of two.
//!
//! Why only completed writes count: a writer that truncates then writes would otherwise be read
//! half-way, and an empty file would look like "all its Services were deleted". The watcher reacts
//! to close-after-write, renames and deletes, never to the intermediate modify events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_model::{yaml_docs, Problem, SourceEvent};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::AgentEvent;

/// (namespace, name). Shared: the entry of the file defining an object and `defs` hold one
/// allocation (at 10k files, 20k keys).
type ObjKey = Arc<(String, String)>;

fn obj_key(m: &ObjectMeta) -> ObjKey {
    Arc::new((m.namespace.clone().unwrap_or_else(|| "default".into()), m.name.clone().unwrap_or_default()))
}

fn is_manifest(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ObjKind {
    Service,
    Slice,
}

/// What one file defined when it was last read: its keys sorted, without duplicates.
///
/// Why slices and shared paths rather than sets: this bookkeeping lives as long as the agent,
/// and at 10k files a `BTreeSet` per file and per object (each a B-tree node of 11 slots for
/// one or two entries) plus a copy of the path per object cost ~15 MiB; sorted boxed slices and
/// one `Arc<Path>` per file cost about half.
#[derive(Debug, Default)]
struct FileEntry {
    stamp: Option<(SystemTime, u64)>,
    keys: Box<[(ObjKind, ObjKey)]>,
}

/// The directory as last read: which objects each file defines. When two files define the same
/// object, the file that sorts last wins (deterministic).
#[derive(Debug, Default)]
pub struct DirState {
    files: BTreeMap<Arc<Path>, FileEntry>,
    /// Files defining each object, sorted (almost always one).
    defs: BTreeMap<(ObjKind, ObjKey), Vec<Arc<Path>>>,
}

/// Insert `path` into the sorted `files` (no duplicates).
fn insert_sorted(files: &mut Vec<Arc<Path>>, path: &Arc<Path>) {
    if let Err(i) = files.binary_search(path) {
        files.insert(i, path.clone());
    }
}

/// Remove `path` from the sorted `files`.
fn remove_sorted(files: &mut Vec<Arc<Path>>, path: &Path) {
    if let Ok(i) = files.binary_search_by(|p| (**p).cmp(path)) {
        files.remove(i);
    }
}

/// One file's objects, parsed.
#[derive(Default)]
struct Parsed {
    events: BTreeMap<(ObjKind, ObjKey), SourceEvent>,
}

fn parse_file(path: &Path, problems: &mut Vec<Problem>) -> Parsed {
    let origin = path.display().to_string();
    let mut out = Parsed::default();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let parsed = yaml_docs::parse(&origin, &text);
            problems.extend(parsed.problems);
            // Later documents of a file replace earlier ones with the same key.
            // Compact now (what the model never reads is dropped), so the copy that waits in the
            // channel is small too.
            for mut s in parsed.services {
                lb_model::state::compact_service(&mut s);
                out.events.insert((ObjKind::Service, obj_key(&s.metadata)), SourceEvent::ServiceUpsert(s));
            }
            for mut s in parsed.slices {
                lb_model::state::compact_slice(&mut s);
                out.events.insert((ObjKind::Slice, obj_key(&s.metadata)), SourceEvent::SliceUpsert(s));
            }
        }
        Err(e) => problems.push(Problem { object: origin, kind: "read", reason: e.to_string() }),
    }
    out
}

impl DirState {
    /// Re-read `paths` (or every manifest in `dir` when `paths` is None) and return the events that
    /// bring a consumer of the previous view up to date, plus the problems of the files re-read.
    /// Objects of re-read files are upserted even if unchanged: the consumer drops equal ones.
    pub fn refresh(
        &mut self,
        dir: &Path,
        paths: Option<&BTreeSet<PathBuf>>,
    ) -> anyhow::Result<(Vec<SourceEvent>, Vec<Problem>)> {
        let candidates: BTreeSet<PathBuf> = match paths {
            Some(p) => p.iter().filter(|p| is_manifest(p)).cloned().collect(),
            None => {
                let mut all: BTreeSet<PathBuf> = std::fs::read_dir(dir)
                    .with_context(|| format!("reading manifests directory {}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_manifest(p))
                    .collect();
                all.extend(self.files.keys().map(|p| p.to_path_buf())); // notice deletions
                all
            }
        };
        let mut problems = Vec::new();
        // One event per object: files are read in path order, so a later winner replaces an
        // earlier one's event.
        let mut events: BTreeMap<(ObjKind, ObjKey), Pending> = BTreeMap::new();
        let mut orphaned: BTreeSet<(ObjKind, ObjKey)> = BTreeSet::new();
        // The files to re-read, in path order, with their stamps (None: gone).
        let stale: Vec<(PathBuf, Option<(SystemTime, u64)>)> = candidates
            .into_iter()
            .filter_map(|path| {
                let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file());
                let stamp = meta.as_ref().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
                // Unchanged since last read: skipped.
                (stamp.is_none() || self.files.get(path.as_path()).map(|f| f.stamp) != Some(stamp)).then_some((path, stamp))
            })
            .collect();
        let mut parsed_all = parse_files(&stale);
        for (i, ((path, stamp), (parsed, file_problems))) in stale.into_iter().zip(parsed_all.iter_mut()).enumerate() {
            problems.extend(std::mem::take(file_problems));
            // The file's shared path: the one already held, else a new one.
            let (path, old) = match self.files.remove_entry(path.as_path()) {
                Some((p, old)) => (p, old),
                None => (Arc::from(path), FileEntry::default()),
            };
            for key in old.keys.iter() {
                if let Some(files) = self.defs.get_mut(key) {
                    remove_sorted(files, &path);
                }
            }
            // `parsed.events` is a BTreeMap: its keys come sorted and unique.
            let mut keys = Vec::with_capacity(parsed.events.len());
            for key in parsed.events.keys() {
                // The key as held from now on: the one `defs` has, else a copy made on this
                // thread. The parsed key was allocated by a parser thread, whose allocator
                // arena otherwise holds only freed temporaries: a long-lived key there would
                // keep a page of it resident.
                let key = match self.defs.get_key_value(key) {
                    Some((held, _)) => held.clone(),
                    None => (key.0, Arc::new((*key.1).clone())),
                };
                let files = self.defs.entry(key.clone()).or_default();
                insert_sorted(files, &path);
                if files.last() == Some(&path) {
                    events.insert(key.clone(), Pending::Parsed(i)); // this file's version wins
                }
                keys.push(key);
            }
            let entry = FileEntry { stamp, keys: keys.into_boxed_slice() };
            orphaned.extend(old.keys.iter().filter(|k| entry.keys.binary_search(k).is_err()).cloned());
            if stamp.is_some() {
                self.files.insert(path, entry);
            }
        }
        // Objects a re-read file no longer defines: deleted, or another file's version takes over.
        for key in orphaned {
            let winner = self.defs.get(&key).and_then(|files| files.last()).cloned();
            match winner {
                None => {
                    self.defs.remove(&key);
                    let (kind, (namespace, name)) = (key.0, (*key.1).clone());
                    let ev = match kind {
                        ObjKind::Service => SourceEvent::ServiceDelete { namespace, name },
                        ObjKind::Slice => SourceEvent::SliceDelete { namespace, name },
                    };
                    events.insert(key, Pending::Event(Box::new(ev)));
                }
                Some(file) if !events.contains_key(&key) => {
                    // Rare (the same object in two files): re-read the file now in charge.
                    if let Some(ev) = parse_file(&file, &mut problems).events.remove(&key) {
                        events.insert(key, Pending::Event(Box::new(ev)));
                    }
                }
                Some(_) => {} // the file in charge was re-read in this refresh already
            }
        }
        // The parsed objects move only now, after the bookkeeping above was allocated: the
        // events are large (a Service ~0.8 KiB), and filed in between they would leave the
        // bookkeeping spread thinly over this thread's arena once freed.
        let events = events
            .into_iter()
            .filter_map(|(key, p)| match p {
                Pending::Event(ev) => Some(*ev),
                Pending::Parsed(i) => parsed_all[i].0.events.remove(&key),
            })
            .collect();
        Ok((events, problems))
    }
}

/// An event of [`DirState::refresh`]: still in its parsed file (the index), or made here
/// (boxed: the map of pending events is allocated among the bookkeeping, small entries keep it
/// dense).
enum Pending {
    Parsed(usize),
    Event(Box<SourceEvent>),
}

/// Files at least this many are parsed on several threads.
const PARALLEL_FILES: usize = 64;

/// Parse the files of `stale` that exist (a stamp), in parallel when there are many: YAML parsing
/// is most of a cold start (10k Services: ~40 MB of YAML), and files are independent. The
/// results are in the order of `stale`, so the caller's bookkeeping is the same as sequential.
fn parse_files(stale: &[(PathBuf, Option<(SystemTime, u64)>)]) -> Vec<(Parsed, Vec<Problem>)> {
    let one = |(path, stamp): &(PathBuf, Option<(SystemTime, u64)>)| {
        let mut problems = Vec::new();
        let parsed = if stamp.is_some() { parse_file(path, &mut problems) } else { Parsed::default() };
        (parsed, problems)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || stale.len() < PARALLEL_FILES {
        return stale.iter().map(one).collect();
    }
    // Each thread takes the next few files until none are left (not a fixed share each): files
    // differ in size, and the machine's other work (the datapath loading its programs at a
    // cold start) takes a core from one thread or the other, so fixed halves end unevenly.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<(Parsed, Vec<Problem>)>> = std::iter::repeat_with(|| None).take(stale.len()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let start = next.fetch_add(PARSE_BATCH, std::sync::atomic::Ordering::Relaxed);
                        if start >= stale.len() {
                            return done;
                        }
                        let end = (start + PARSE_BATCH).min(stale.len());
                        done.extend((start..end).map(|i| (i, one(&stale[i]))));
                    }
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().expect("a manifest parser thread panicked") {
                results[i] = Some(r);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every file was parsed")).collect()
}

/// Files a parser thread takes at a time: small enough to even out the threads' ends, large
/// enough that taking them costs nothing.
const PARSE_BATCH: usize = 16;

/// The first scan's events as one resync: the model replaces everything at once.
fn as_resync(events: Vec<SourceEvent>) -> SourceEvent {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for ev in events {
        match ev {
            SourceEvent::ServiceUpsert(s) => services.push(s),
            SourceEvent::SliceUpsert(s) => slices.push(s),
            _ => {}
        }
    }
    SourceEvent::Resync { services: Some(services), slices: Some(slices) }
}

/// What a notify event asks for: these paths re-read, or a full rescan.
fn interesting(ev: &notify::Event) -> Option<Option<Vec<PathBuf>>> {
    if ev.need_rescan() {
        return Some(None);
    }
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => Some(Some(ev.paths.clone())),
        // Intermediate writes: wait for the close.
        EventKind::Modify(_) | EventKind::Create(_) | EventKind::Access(_) => None,
        _ => Some(None),
    }
}

/// Send the problems, then the events, of one scan; false once the receiver is gone.
async fn send_scan(tx: &mpsc::Sender<AgentEvent>, problems: Vec<Problem>, events: Vec<SourceEvent>) -> bool {
    let problems = problems.into_iter().map(AgentEvent::Problem);
    for ev in problems.chain(events.into_iter().map(AgentEvent::Source)) {
        if tx.send(ev).await.is_err() {
            return false;
        }
    }
    true
}

/// Watch `dir` and send what changes, problems included, on `tx` until `tx` closes.
pub async fn run(dir: PathBuf, tx: mpsc::Sender<AgentEvent>) -> anyhow::Result<()> {
    // None = full rescan.
    let (ntx, mut nrx) = mpsc::unbounded_channel::<Option<Vec<PathBuf>>>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            if let Some(req) = interesting(&ev) {
                let _ = ntx.send(req);
            }
        }
        Err(_) => {
            let _ = ntx.send(None);
        }
    })
    .context("starting the directory watcher")?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).with_context(|| format!("watching {}", dir.display()))?;

    let mut state = DirState::default();
    let started = std::time::Instant::now();
    let (events, problems) = state.refresh(&dir, None)?;
    let resync = as_resync(events);
    super::set_first_read(started.elapsed());
    tracing::info!(files = state.files.len(), micros = started.elapsed().as_micros() as u64, "manifests read");
    if !send_scan(&tx, problems, vec![resync, SourceEvent::Synced]).await {
        return Ok(());
    }
    while let Some(first) = nrx.recv().await {
        // Coalesce what is already queued.
        let mut paths: Option<BTreeSet<PathBuf>> = first.map(|p| p.into_iter().collect());
        while let Ok(more) = nrx.try_recv() {
            paths = match (paths, more) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                _ => None,
            };
        }
        match state.refresh(&dir, paths.as_ref()) {
            Ok((events, problems)) => {
                if !send_scan(&tx, problems, events).await {
                    return Ok(());
                }
            }
            // An unreadable directory keeps the last state (never flush on a source error).
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "manifests scan failed; keeping the last state"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{test_dir, TEST_SERVICE as SVC};

    fn names(evs: &[SourceEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                SourceEvent::ServiceUpsert(s) => format!(
                    "svc+{}@{}",
                    s.metadata.name.clone().unwrap(),
                    s.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
                ),
                SourceEvent::ServiceDelete { name, .. } => format!("svc-{name}"),
                SourceEvent::SliceUpsert(s) => format!("slice+{}", s.metadata.name.clone().unwrap()),
                SourceEvent::SliceDelete { name, .. } => format!("slice-{name}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn only_rewritten_files_produce_events() {
        let dir = test_dir("manifests");
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut st = DirState::default();
        let (evs, probs) = st.refresh(&dir, None).unwrap();
        assert_eq!(names(&evs), ["svc+a@10.96.0.1"]);
        assert!(probs.is_empty());
        // Unchanged rescan: nothing is re-read.
        assert!(st.refresh(&dir, None).unwrap().0.is_empty());
        // Invalid file next to it: a problem, no event, a stays.
        std::fs::write(dir.join("b.yaml"), "kind: Service\napiVersion: v1\nspec: [").unwrap();
        let (evs, probs) = st.refresh(&dir, None).unwrap();
        assert!(evs.is_empty());
        assert_eq!(probs.len(), 1, "{probs:?}");
        // Deleting the file deletes its Service.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let p: BTreeSet<PathBuf> = [dir.join("a.yaml")].into();
        assert_eq!(names(&st.refresh(&dir, Some(&p)).unwrap().0), ["svc-a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_object_last_file_wins_and_falls_back() {
        let dir = test_dir("manifests");
        std::fs::write(dir.join("1.yaml"), SVC).unwrap();
        std::fs::write(dir.join("2.yaml"), SVC.replace("10.96.0.1", "10.96.0.2")).unwrap();
        let mut st = DirState::default();
        assert_eq!(names(&st.refresh(&dir, None).unwrap().0), ["svc+a@10.96.0.2"]);
        std::fs::remove_file(dir.join("2.yaml")).unwrap();
        assert_eq!(names(&st.refresh(&dir, None).unwrap().0), ["svc+a@10.96.0.1"]);
        std::fs::remove_file(dir.join("1.yaml")).unwrap();
        assert_eq!(names(&st.refresh(&dir, None).unwrap().0), ["svc-a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parallel_parse_keeps_the_order_of_the_files() {
        // More files than PARALLEL_FILES, some missing and some invalid: results in input order.
        let dir = test_dir("manifests");
        let n = PARALLEL_FILES * 3 + 5;
        let mut stale = Vec::new();
        for i in 0..n {
            let path = dir.join(format!("{i:04}.yaml"));
            let text = match i % 7 {
                3 => "kind: Service\napiVersion: v1\nspec: [".to_string(),
                _ => SVC.replace("name: a", &format!("name: s{i}")),
            };
            std::fs::write(&path, text).unwrap();
            let stamp = (i % 11 != 5).then_some((SystemTime::UNIX_EPOCH, 0));
            stale.push((path, stamp));
        }
        let got = parse_files(&stale);
        assert_eq!(got.len(), n);
        for (i, (parsed, problems)) in got.iter().enumerate() {
            let names: Vec<String> = parsed.events.values().map(|e| names(std::slice::from_ref(e)).remove(0)).collect();
            match (i % 11 == 5, i % 7 == 3) {
                (true, _) => assert!(names.is_empty() && problems.is_empty(), "{i}"),
                (false, true) => assert!(names.is_empty() && problems.len() == 1, "{i}"),
                (false, false) => assert_eq!(names, [format!("svc+s{i}@10.96.0.1")], "{i}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_object_moving_between_files_is_not_deleted() {
        let dir = test_dir("manifests");
        std::fs::write(dir.join("1.yaml"), SVC).unwrap();
        let mut st = DirState::default();
        st.refresh(&dir, None).unwrap();
        std::fs::write(dir.join("2.yaml"), SVC).unwrap();
        std::fs::remove_file(dir.join("1.yaml")).unwrap();
        let evs = names(&st.refresh(&dir, None).unwrap().0);
        assert!(!evs.iter().any(|e| e.starts_with("svc-")), "{evs:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
