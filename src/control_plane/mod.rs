//! The control plane (`outrigger control-plane`): holds the mesh-wide view
//! and streams to every proxy exactly the config it needs, as the same
//! document a proxy reads from a file.
//!
//! - `model`: the mesh model (Kubernetes and Gateway API types, and the
//!   own kinds of `kinds`), validation that names file, document and field.
//! - `source`: where the model comes from (a watched directory of YAML,
//!   or the Kubernetes API), behind one trait.
//! - `render`: model → one proxy's config.
//! - `server`: the feed, acks, the node list, the CA endpoint.
//!
//! It shares only `config/` and `tls/` with the data plane.

pub mod kinds;
pub mod model;
pub mod render;
