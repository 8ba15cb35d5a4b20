//! Where the mesh model comes from, behind one trait: a directory of YAML
//! documents (GitOps style: multi-document files, watched), or the
//! Kubernetes API (`kube` module). A source publishes each new model; the
//! control plane validates it, and an invalid one is refused with every
//! error named while the last good model keeps serving.

use super::model::{Mesh, ModelError};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Takes a candidate model; says whether it was accepted.
pub type Publish = Box<dyn Fn(Mesh, &str) -> bool + Send + Sync>;

pub trait Source: Send + 'static {
    /// Runs for the life of the control plane, publishing each model.
    fn run(self: Box<Self>, publish: Publish) -> BoxFuture;
}

/// Every `*.yaml`/`*.yml` file under a directory (recursively), polled:
/// a change is taken once the files have stayed the same for one interval,
/// so a half-written file is never published.
pub struct DirSource {
    pub dir: PathBuf,
    pub interval: Duration,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            out.push(p);
        }
    }
}

/// The directory's documents: (file, text) in a stable order.
pub fn read_dir_docs(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    yaml_files(dir, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            Some((p.display().to_string(), text))
        })
        .collect()
}

/// Parses every file into one model; errors name file, document and field.
pub fn parse_docs(docs: &[(String, String)]) -> Result<Mesh, Vec<ModelError>> {
    let mut mesh = Mesh::default();
    let mut errors = Vec::new();
    for (name, text) in docs {
        mesh.load_text(name, text, &mut errors);
    }
    if errors.is_empty() {
        Ok(mesh)
    } else {
        Err(errors)
    }
}

impl Source for DirSource {
    fn run(self: Box<Self>, publish: Publish) -> BoxFuture {
        Box::pin(async move {
            let mut last: Option<Vec<(String, String)>> = None;
            let mut pending: Option<Vec<(String, String)>> = None;
            loop {
                let dir = self.dir.clone();
                let docs = tokio::task::spawn_blocking(move || read_dir_docs(&dir))
                    .await
                    .unwrap_or_default();
                let first = last.is_none();
                if last.as_ref() != Some(&docs) {
                    if first || pending.as_ref() == Some(&docs) {
                        pending = None;
                        match parse_docs(&docs) {
                            Ok(mesh) => {
                                publish(mesh, &self.dir.display().to_string());
                            }
                            Err(errors) => {
                                crate::telemetry::metrics()
                                    .cp_model_updates
                                    .with_label_values(&["invalid"])
                                    .inc();
                                let list: Vec<String> =
                                    errors.iter().map(|e| e.to_string()).collect();
                                tracing::warn!(errors = ?list, "mesh documents refused; the last good model keeps serving");
                            }
                        }
                        last = Some(docs);
                    } else {
                        pending = Some(docs);
                    }
                } else {
                    pending = None;
                }
                tokio::time::sleep(self.interval).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_mesh_in_config_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mesh");
        let docs = super::read_dir_docs(&dir);
        assert!(!docs.is_empty());
        let mesh = super::parse_docs(&docs).unwrap_or_else(|e| panic!("{e:?}"));
        mesh.validate().unwrap();
        assert_eq!(mesh.services.len(), 4);
    }
}
