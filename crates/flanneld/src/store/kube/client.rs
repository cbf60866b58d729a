//! The Kubernetes API client: configuration as client-go's `BuildConfigFromFlags`, and the
//! handful of typed requests flannel makes (get node, get pod, patch node status).

use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::params::{GetParams, ListParams, Patch, PatchParams, WatchParams};
use kube::core::{Request, WatchEvent};
use kube::{Client, Config};

use super::node::{MiniNode, MiniNodeList, MiniPod};
use crate::store::StoreError;

const NODES: &str = "/api/v1/nodes";

/// Builds the client: `--kubeconfig-file` (current context; `--kube-api-url` overrides its
/// server), else `--kube-api-url` alone, else the in-cluster service account.
pub async fn build(api_url: &str, kubeconfig: &str) -> Result<Client, StoreError> {
    let fail =
        |context: &str, e: Box<dyn std::error::Error + Send + Sync>| StoreError::Unavailable {
            context: context.to_string(),
            source: e,
        };
    let mut config = if !kubeconfig.is_empty() {
        let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| {
            fail(
                &format!("fail to create kubernetes config: reading {kubeconfig}"),
                e.into(),
            )
        })?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| {
                fail(
                    &format!("fail to create kubernetes config from {kubeconfig}"),
                    e.into(),
                )
            })?
    } else if !api_url.is_empty() {
        Config::new(parse_url(api_url)?)
    } else {
        Config::incluster().map_err(|e| {
            fail(
                "fail to create kubernetes config: not running in a pod (no in-cluster service account); \
                 pass --kubeconfig-file or --kube-api-url",
                e.into(),
            )
        })?
    };
    if !kubeconfig.is_empty() && !api_url.is_empty() {
        config.cluster_url = parse_url(api_url)?;
    }
    config.connect_timeout = Some(Duration::from_secs(10));
    Client::try_from(config).map_err(|e| fail("fail to create kubernetes client", e.into()))
}

fn parse_url(url: &str) -> Result<http::Uri, StoreError> {
    url.parse::<http::Uri>()
        .map_err(|e| StoreError::Unavailable {
            context: format!("invalid --kube-api-url {url:?}"),
            source: e.into(),
        })
}

/// One line for an operator: what failed and, for the usual causes, what to check.
pub fn explain(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let hint = match s.code {
                401 => " (the API server rejected flanneld's credentials: check the service-account token or kubeconfig)",
                403 => " (flanneld's identity lacks a permission: it needs the ClusterRole of packaging/kube-flannel.yml: pods get; nodes get, list, watch; nodes/status patch)",
                410 => " (resource version expired)",
                _ => "",
            };
            let reason = s.reason.clone();
            format!("{} {}: {}{hint}", s.code, reason, s.message)
        }
        other => {
            let mut text = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(s) = src {
                let t = s.to_string();
                if !text.contains(&t) {
                    text.push_str(": ");
                    text.push_str(&t);
                }
                src = s.source();
            }
            text
        }
    }
}

/// The HTTP status of an API error, if the server answered.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// GET a node.
pub async fn get_node(client: &Client, name: &str) -> Result<MiniNode, kube::Error> {
    let req = Request::new(NODES)
        .get(name, &GetParams::default())
        .map_err(kube::Error::BuildRequest)?;
    client.request(req).await
}

/// GET a pod (to learn which node we run on).
pub async fn get_pod(client: &Client, namespace: &str, name: &str) -> Result<MiniPod, kube::Error> {
    let req = Request::new(format!("/api/v1/namespaces/{namespace}/pods"))
        .get(name, &GetParams::default())
        .map_err(kube::Error::BuildRequest)?;
    client.request(req).await
}

/// Strategic-merge PATCH of `nodes/<name>/status` (metadata and status pass; the reference RBAC
/// allows exactly this).
pub async fn patch_node_status(
    client: &Client,
    name: &str,
    patch: &serde_json::Value,
) -> Result<MiniNode, kube::Error> {
    let req = Request::new(NODES)
        .patch_subresource(
            "status",
            name,
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .map_err(kube::Error::BuildRequest)?;
    client.request(req).await
}

/// One page of the node list.
pub async fn list_nodes(
    client: &Client,
    limit: u32,
    continue_token: Option<String>,
) -> Result<MiniNodeList, kube::Error> {
    let lp = ListParams {
        limit: Some(limit),
        continue_token,
        ..ListParams::default()
    };
    let req = Request::new(NODES)
        .list(&lp)
        .map_err(kube::Error::BuildRequest)?;
    client.request(req).await
}

/// Opens a node watch from `resource_version` with bookmarks and a server-side timeout.
pub async fn watch_nodes(
    client: &Client,
    resource_version: &str,
    timeout_secs: u32,
) -> Result<
    impl futures::Stream<Item = Result<WatchEvent<MiniNode>, kube::Error>> + use<>,
    kube::Error,
> {
    let wp = WatchParams {
        timeout: Some(timeout_secs),
        bookmarks: true,
        ..WatchParams::default()
    };
    let req = Request::new(NODES)
        .watch(&wp, resource_version)
        .map_err(kube::Error::BuildRequest)?;
    client.request_events::<MiniNode>(req).await
}
