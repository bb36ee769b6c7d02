//! The manifests source: every `*.yaml` / `*.yml` / `*.json` file of a directory (Services and
//! EndpointSlices), watched with inotify (through `notify`).
//!
//! Why it is incremental: with 10k Services in 10k files, re-reading the directory on every change
//! would cost far more than the map update it triggers. Each file's parse is cached; an event
//! re-reads only the files it names, and the source sends object-level Upsert/Delete events for
//! what actually changed. The first scan is sent as one `Resync` followed by `Synced`.
//!
//! Why only completed writes count: a writer that truncates then writes would otherwise be read
//! half-way, and an empty file would look like "all its Services were deleted". The watcher reacts
//! to close-after-write, renames and deletes, never to the intermediate modify events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_model::{manifest, Problem, SourceEvent};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

type ObjKey = (String, String);

fn obj_key(m: &ObjectMeta) -> ObjKey {
    (m.namespace.clone().unwrap_or_else(|| "default".into()), m.name.clone().unwrap_or_default())
}

fn is_manifest(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// What one file held when it was last read.
#[derive(Debug, Default)]
struct FileEntry {
    stamp: Option<(SystemTime, u64)>,
    services: BTreeMap<ObjKey, Service>,
    slices: BTreeMap<ObjKey, EndpointSlice>,
}

/// The directory as last read: per-file content, and the merged view the agent was told about.
/// When two files define the same object, the file that sorts last wins (deterministic).
#[derive(Debug, Default)]
pub struct DirState {
    files: BTreeMap<PathBuf, FileEntry>,
    services: BTreeMap<ObjKey, Service>,
    slices: BTreeMap<ObjKey, EndpointSlice>,
}

impl DirState {
    /// Re-read `paths` (or every manifest in `dir` when `paths` is None) and return the events that
    /// bring a consumer of the previous view up to date, plus the problems of the files re-read.
    pub fn refresh(&mut self, dir: &Path, paths: Option<&BTreeSet<PathBuf>>) -> anyhow::Result<(Vec<SourceEvent>, Vec<Problem>)> {
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
        let mut touched_svc: BTreeSet<ObjKey> = BTreeSet::new();
        let mut touched_slice: BTreeSet<ObjKey> = BTreeSet::new();
        for path in candidates {
            let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file());
            let stamp = meta.as_ref().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            if stamp.is_some() && self.files.get(&path).map(|f| f.stamp) == Some(stamp) {
                continue; // unchanged since last read
            }
            let old = self.files.remove(&path).unwrap_or_default();
            touched_svc.extend(old.services.into_keys());
            touched_slice.extend(old.slices.into_keys());
            if stamp.is_none() {
                continue; // deleted
            }
            let origin = path.display().to_string();
            let mut entry = FileEntry { stamp, ..Default::default() };
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let parsed = manifest::parse(&origin, &text);
                    problems.extend(parsed.problems);
                    entry.services = parsed.services.into_iter().map(|s| (obj_key(&s.metadata), s)).collect();
                    entry.slices = parsed.slices.into_iter().map(|s| (obj_key(&s.metadata), s)).collect();
                }
                Err(e) => problems.push(Problem { object: origin, kind: "read", reason: e.to_string() }),
            }
            touched_svc.extend(entry.services.keys().cloned());
            touched_slice.extend(entry.slices.keys().cloned());
            self.files.insert(path, entry);
        }

        let mut events = Vec::new();
        for key in touched_svc {
            let now = self.files.values().rev().find_map(|f| f.services.get(&key)).cloned();
            match (now, self.services.get(&key)) {
                (Some(n), Some(o)) if &n == o => {}
                (Some(n), _) => {
                    self.services.insert(key, n.clone());
                    events.push(SourceEvent::ServiceUpsert(n));
                }
                (None, Some(_)) => {
                    self.services.remove(&key);
                    events.push(SourceEvent::ServiceDelete { namespace: key.0, name: key.1 });
                }
                (None, None) => {}
            }
        }
        for key in touched_slice {
            let now = self.files.values().rev().find_map(|f| f.slices.get(&key)).cloned();
            match (now, self.slices.get(&key)) {
                (Some(n), Some(o)) if &n == o => {}
                (Some(n), _) => {
                    self.slices.insert(key, n.clone());
                    events.push(SourceEvent::SliceUpsert(n));
                }
                (None, Some(_)) => {
                    self.slices.remove(&key);
                    events.push(SourceEvent::SliceDelete { namespace: key.0, name: key.1 });
                }
                (None, None) => {}
            }
        }
        Ok((events, problems))
    }

    /// The whole current view as one resync event.
    pub fn resync(&self) -> SourceEvent {
        SourceEvent::Resync {
            services: Some(self.services.values().cloned().collect()),
            slices: Some(self.slices.values().cloned().collect()),
        }
    }
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

/// Watch `dir` until `tx` closes. Problems go to `on_problem` (log line + metric).
pub async fn run(
    dir: PathBuf,
    tx: mpsc::Sender<SourceEvent>,
    on_problem: impl Fn(&Problem) + Send + 'static,
) -> anyhow::Result<()> {
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
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;

    let mut state = DirState::default();
    let (_, problems) = state.refresh(&dir, None)?;
    problems.iter().for_each(&on_problem);
    if tx.send(state.resync()).await.is_err() || tx.send(SourceEvent::Synced).await.is_err() {
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
                problems.iter().for_each(&on_problem);
                for ev in events {
                    if tx.send(ev).await.is_err() {
                        return Ok(());
                    }
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

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n";

    fn names(evs: &[SourceEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                SourceEvent::ServiceUpsert(s) => format!("svc+{}", s.metadata.name.clone().unwrap()),
                SourceEvent::ServiceDelete { name, .. } => format!("svc-{name}"),
                SourceEvent::SliceUpsert(s) => format!("slice+{}", s.metadata.name.clone().unwrap()),
                SourceEvent::SliceDelete { name, .. } => format!("slice-{name}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn only_changed_objects_produce_events() {
        let dir = tempdir();
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let mut st = DirState::default();
        let (evs, probs) = st.refresh(&dir, None).unwrap();
        assert_eq!(names(&evs), ["svc+a"]);
        assert!(probs.is_empty());
        // Unchanged rescan: nothing.
        assert!(st.refresh(&dir, None).unwrap().0.is_empty());
        // Same content rewritten (new mtime): re-read, but no event.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        let p: BTreeSet<PathBuf> = [dir.join("a.yaml")].into();
        assert!(st.refresh(&dir, Some(&p)).unwrap().0.is_empty());
        // Invalid file next to it: a problem, no event, a stays.
        std::fs::write(dir.join("b.yaml"), "kind: Service\napiVersion: v1\nspec: [").unwrap();
        let (evs, probs) = st.refresh(&dir, None).unwrap();
        assert!(evs.is_empty());
        assert_eq!(probs.len(), 1, "{probs:?}");
        // Deleting the file deletes its Service.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(names(&st.refresh(&dir, Some(&p)).unwrap().0), ["svc-a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_object_last_file_wins_and_falls_back() {
        let dir = tempdir();
        std::fs::write(dir.join("1.yaml"), SVC).unwrap();
        std::fs::write(dir.join("2.yaml"), SVC.replace("10.96.0.1", "10.96.0.2")).unwrap();
        let mut st = DirState::default();
        st.refresh(&dir, None).unwrap();
        let ip = |st: &DirState| st.services[&("default".into(), "a".into())].spec.as_ref().unwrap().cluster_ip.clone();
        assert_eq!(ip(&st).as_deref(), Some("10.96.0.2"));
        std::fs::remove_file(dir.join("2.yaml")).unwrap();
        let (evs, _) = st.refresh(&dir, None).unwrap();
        assert_eq!(names(&evs), ["svc+a"]);
        assert_eq!(ip(&st).as_deref(), Some("10.96.0.1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir()
            .join(format!("xlb-manifests-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
