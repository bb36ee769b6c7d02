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

/// Objects of one kind in one file. A Vec, not a map: a file holds a few objects, and a BTreeMap
/// would reserve 11 inline slots of these large structs per file.
#[derive(Debug)]
struct Objs<T>(Vec<(ObjKey, T)>);

impl<T> Default for Objs<T> {
    fn default() -> Self {
        Objs(Vec::new())
    }
}

impl<T> Objs<T> {
    /// Later documents of a file replace earlier ones with the same key.
    fn from_parsed(items: Vec<T>, meta: impl Fn(&T) -> &ObjectMeta) -> Self {
        let mut v: Vec<(ObjKey, T)> = Vec::with_capacity(items.len());
        for item in items {
            let key = obj_key(meta(&item));
            v.retain(|(k, _)| *k != key);
            v.push((key, item));
        }
        Objs(v)
    }
    fn get(&self, key: &ObjKey) -> Option<&T> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn keys(&self) -> impl Iterator<Item = &ObjKey> {
        self.0.iter().map(|(k, _)| k)
    }
}

/// What one file held when it was last read.
#[derive(Debug, Default)]
struct FileEntry {
    stamp: Option<(SystemTime, u64)>,
    services: Objs<Service>,
    slices: Objs<EndpointSlice>,
}

/// Which files define one object, and which of them the consumer was last told about.
#[derive(Debug, Default)]
struct Defs {
    /// Files defining the object; the last one (in path order) wins, deterministically.
    files: BTreeMap<ObjKey, BTreeSet<PathBuf>>,
    /// The file whose version of the object was last sent.
    sent: BTreeMap<ObjKey, PathBuf>,
}

/// The directory as last read: each file's objects, indexed by object. Objects are held once (in
/// their file's entry), so 10k Services cost one copy here and one in the cluster state.
#[derive(Debug, Default)]
pub struct DirState {
    files: BTreeMap<PathBuf, FileEntry>,
    services: Defs,
    slices: Defs,
}

/// Emit the events for the touched keys of one kind: compare the object last sent (from the
/// file's old entry if that file was just re-read) with the current winner.
fn diff_kind<T: Clone + PartialEq>(
    defs: &mut Defs,
    touched: BTreeSet<ObjKey>,
    files: &BTreeMap<PathBuf, FileEntry>,
    old: &BTreeMap<PathBuf, FileEntry>,
    get: impl Fn(&FileEntry) -> &Objs<T>,
    upsert: impl Fn(T) -> SourceEvent,
    delete: impl Fn(ObjKey) -> SourceEvent,
    events: &mut Vec<SourceEvent>,
) {
    for key in touched {
        let before = defs.sent.get(&key).and_then(|p| old.get(p).or_else(|| files.get(p))).and_then(|f| get(f).get(&key));
        let winner = defs.files.get(&key).and_then(|s| s.last()).cloned();
        let now = winner.as_ref().and_then(|p| files.get(p)).and_then(|f| get(f).get(&key));
        match (now, before) {
            (Some(n), Some(b)) if n == b => {}
            (Some(n), _) => events.push(upsert(n.clone())),
            (None, Some(_)) => events.push(delete(key.clone())),
            (None, None) => {}
        }
        match winner {
            Some(p) => defs.sent.insert(key, p),
            None => defs.sent.remove(&key),
        };
    }
}

fn index<T>(defs: &mut Defs, path: &Path, objs: &Objs<T>, add: bool) {
    for key in objs.keys() {
        let set = defs.files.entry(key.clone()).or_default();
        if add {
            set.insert(path.to_path_buf());
        } else {
            set.remove(path);
            if set.is_empty() {
                defs.files.remove(key);
            }
        }
    }
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
        let mut old_entries: BTreeMap<PathBuf, FileEntry> = BTreeMap::new();
        for path in candidates {
            let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file());
            let stamp = meta.as_ref().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            if stamp.is_some() && self.files.get(&path).map(|f| f.stamp) == Some(stamp) {
                continue; // unchanged since last read
            }
            if let Some(old) = self.files.remove(&path) {
                index(&mut self.services, &path, &old.services, false);
                index(&mut self.slices, &path, &old.slices, false);
                touched_svc.extend(old.services.keys().cloned());
                touched_slice.extend(old.slices.keys().cloned());
                old_entries.insert(path.clone(), old);
            }
            if stamp.is_none() {
                continue; // deleted
            }
            let origin = path.display().to_string();
            let mut entry = FileEntry { stamp, ..Default::default() };
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let parsed = manifest::parse(&origin, &text);
                    problems.extend(parsed.problems);
                    entry.services = Objs::from_parsed(parsed.services, |s| &s.metadata);
                    entry.slices = Objs::from_parsed(parsed.slices, |s| &s.metadata);
                }
                Err(e) => problems.push(Problem { object: origin, kind: "read", reason: e.to_string() }),
            }
            index(&mut self.services, &path, &entry.services, true);
            index(&mut self.slices, &path, &entry.slices, true);
            touched_svc.extend(entry.services.keys().cloned());
            touched_slice.extend(entry.slices.keys().cloned());
            self.files.insert(path, entry);
        }

        let mut events = Vec::new();
        diff_kind(
            &mut self.services,
            touched_svc,
            &self.files,
            &old_entries,
            |f| &f.services,
            SourceEvent::ServiceUpsert,
            |(namespace, name)| SourceEvent::ServiceDelete { namespace, name },
            &mut events,
        );
        diff_kind(
            &mut self.slices,
            touched_slice,
            &self.files,
            &old_entries,
            |f| &f.slices,
            SourceEvent::SliceUpsert,
            |(namespace, name)| SourceEvent::SliceDelete { namespace, name },
            &mut events,
        );
        Ok((events, problems))
    }

    fn current<'a, T: 'a>(&'a self, defs: &'a Defs, get: impl Fn(&'a FileEntry) -> &'a Objs<T>) -> impl Iterator<Item = &'a T> {
        defs.sent.iter().filter_map(move |(k, p)| self.files.get(p).and_then(|f| get(f).get(k)))
    }

    /// The whole current view as one resync event.
    pub fn resync(&self) -> SourceEvent {
        SourceEvent::Resync {
            services: Some(self.current(&self.services, |f| &f.services).cloned().collect()),
            slices: Some(self.current(&self.slices, |f| &f.slices).cloned().collect()),
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
        let ip = |st: &DirState| match st.resync() {
            SourceEvent::Resync { services: Some(s), .. } => s[0].spec.as_ref().unwrap().cluster_ip.clone(),
            _ => unreachable!(),
        };
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
