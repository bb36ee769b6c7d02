//! Where the cluster state comes from: a directory of manifests, or the Kubernetes API (lb-kube).
//! Every source sends `lb_model::SourceEvent`s on one channel; the agent does not care which.

pub mod manifests;
