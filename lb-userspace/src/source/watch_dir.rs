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
use std::time::SystemTime;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_model::{yaml_docs, Problem, SourceEvent};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::AgentEvent;

type ObjKey = (String, String);

fn obj_key(m: &ObjectMeta) -> ObjKey {
    (m.namespace.clone().unwrap_or_else(|| "default".into()), m.name.clone().unwrap_or_default())
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

/// What one file defined when it was last read.
#[derive(Debug, Default)]
struct FileEntry {
    stamp: Option<(SystemTime, u64)>,
    keys: BTreeSet<(ObjKind, ObjKey)>,
}

/// The directory as last read: which objects each file defines. When two files define the same
/// object, the file that sorts last wins (deterministic).
#[derive(Debug, Default)]
pub struct DirState {
    files: BTreeMap<PathBuf, FileEntry>,
    /// Files defining each object.
    defs: BTreeMap<(ObjKind, ObjKey), BTreeSet<PathBuf>>,
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
                all.extend(self.files.keys().cloned()); // notice deletions
                all
            }
        };
        let mut problems = Vec::new();
        // One event per object: files are read in path order, so a later winner replaces an
        // earlier one's event.
        let mut events: BTreeMap<(ObjKind, ObjKey), SourceEvent> = BTreeMap::new();
        let mut orphaned: BTreeSet<(ObjKind, ObjKey)> = BTreeSet::new();
        // The files to re-read, in path order, with their stamps (None: gone).
        let stale: Vec<(PathBuf, Option<(SystemTime, u64)>)> = candidates
            .into_iter()
            .filter_map(|path| {
                let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file());
                let stamp = meta.as_ref().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
                // Unchanged since last read: skipped.
                (stamp.is_none() || self.files.get(&path).map(|f| f.stamp) != Some(stamp)).then_some((path, stamp))
            })
            .collect();
        let parsed_all = parse_files(&stale);
        for ((path, stamp), (parsed, file_problems)) in stale.into_iter().zip(parsed_all) {
            problems.extend(file_problems);
            let old = self.files.remove(&path).unwrap_or_default();
            for key in &old.keys {
                if let Some(set) = self.defs.get_mut(key) {
                    set.remove(&path);
                }
            }
            let mut entry = FileEntry { stamp, keys: BTreeSet::new() };
            for (key, ev) in parsed.events {
                let set = self.defs.entry(key.clone()).or_default();
                set.insert(path.clone());
                if set.last() == Some(&path) {
                    events.insert(key.clone(), ev); // this file's version wins
                }
                entry.keys.insert(key);
            }
            orphaned.extend(old.keys.difference(&entry.keys).cloned());
            if stamp.is_some() {
                self.files.insert(path, entry);
            }
        }
        // Objects a re-read file no longer defines: deleted, or another file's version takes over.
        for key in orphaned {
            let winner = self.defs.get(&key).and_then(|s| s.last()).cloned();
            match winner {
                None => {
                    self.defs.remove(&key);
                    let (kind, (namespace, name)) = key.clone();
                    let ev = match kind {
                        ObjKind::Service => SourceEvent::ServiceDelete { namespace, name },
                        ObjKind::Slice => SourceEvent::SliceDelete { namespace, name },
                    };
                    events.insert(key, ev);
                }
                Some(file) if !events.contains_key(&key) => {
                    // Rare (the same object in two files): re-read the file now in charge.
                    if let Some(ev) = parse_file(&file, &mut problems).events.remove(&key) {
                        events.insert(key, ev);
                    }
                }
                Some(_) => {} // the file in charge was re-read in this refresh already
            }
        }
        Ok((events.into_values().collect(), problems))
    }
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
    let chunk = stale.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = stale
            .chunks(chunk)
            .map(|files| s.spawn(move || files.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a manifest parser thread panicked"))
            .collect()
    })
}

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
