//! openraft glue: the type configuration, the Raft instance of this node and its (for now
//! single-node) network.
//!
//! Architecture invariant: only `node` (start-up), `admin` (through [`Cluster::write`]) and
//! `store` (which implements openraft's storage traits for [`TypeConfig`]) reach this module;
//! openraft types do not leak into `state`, `model` or `audit`.

use crate::state::{Command, Response};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

openraft::declare_raft_types!(
    /// Raft types of apim: commands in, responses out, node ids are integers.
    pub TypeConfig:
        D = Command,
        R = Response,
);

pub type NodeId = u64;
pub type ApimRaft = Raft<TypeConfig>;

/// Error of a write through Raft.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("this node is not the leader (leader: {0:?}); retry on the leader")]
    NotLeader(Option<NodeId>),
    #[error("the cluster cannot commit changes right now: {0}")]
    Unavailable(String),
}

/// Network of a cluster of one: there is no peer to reach. Multi-node clustering replaces this
/// with HTTP/2 + mutual TLS between nodes.
#[derive(Clone, Default)]
pub struct NoPeers;

pub struct NoPeer(NodeId);

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeer;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> NoPeer {
        NoPeer(target)
    }
}

fn unreachable<E: std::error::Error>(target: NodeId) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
        "node {target}: peer networking is not enabled on this node"
    ))))
}

impl RaftNetwork<TypeConfig> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(unreachable(self.0))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable(self.0))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(unreachable(self.0))
    }
}

/// Settings of the Raft engine for this node.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot.
    pub keep_logs: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            snapshot_every: 10_000,
            keep_logs: 1_000,
        }
    }
}

/// This node's Raft instance.
#[derive(Clone)]
pub struct Cluster {
    pub raft: ApimRaft,
    pub node_id: NodeId,
}

impl Cluster {
    /// Starts Raft over the given stores and, on first start, initialises a cluster of one.
    /// Returns once this node is leader (or the timeout passes).
    pub async fn start(
        node_id: NodeId,
        addr: String,
        settings: &RaftSettings,
        log_store: crate::store::LogStore,
        state_machine: crate::store::StateMachine,
    ) -> anyhow::Result<Cluster> {
        let config = Config {
            cluster_name: "apim".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every),
            max_in_snapshot_log_to_keep: settings.keep_logs,
            purge_batch_size: 1,
            max_payload_entries: 512,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let raft = Raft::new(node_id, config, NoPeers, log_store, state_machine).await?;
        if !raft.is_initialized().await? {
            let mut members = BTreeMap::new();
            members.insert(node_id, BasicNode { addr });
            raft.initialize(members).await?;
        }
        let m = raft
            .wait(Some(Duration::from_secs(30)))
            .current_leader(node_id, "this node becomes leader")
            .await
            .map_err(|e| anyhow::anyhow!("Raft did not elect this node within 30 s: {e}"))?;
        // A new leader commits a blank entry of its term, which commits everything before it.
        // Serve only once all of that is applied, so no read (and no bootstrap decision) sees
        // the state as it was before a crash.
        raft.wait(Some(Duration::from_secs(300)))
            .applied_index_at_least(
                m.last_log_index,
                "the state machine catches up with the log",
            )
            .await
            .map_err(|e| anyhow::anyhow!("the state did not catch up with the Raft log: {e}"))?;
        Ok(Cluster { raft, node_id })
    }

    /// Proposes a command and waits until it is committed and applied.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader(f.leader_id))
            }
            Err(e) => Err(WriteError::Unavailable(e.to_string())),
        }
    }

    /// A short health summary for `apim status`.
    pub fn health(&self) -> serde_json::Value {
        let m = self.raft.metrics().borrow().clone();
        serde_json::json!({
            "node_id": self.node_id,
            "state": format!("{:?}", m.state),
            "leader": m.current_leader,
            "term": m.current_term,
            "last_log_index": m.last_log_index,
            "last_applied": m.last_applied.map(|l| l.index),
            "snapshot": m.snapshot.map(|l| l.index),
            "purged": m.purged.map(|l| l.index),
            "members": m.membership_config.membership().voter_ids().collect::<Vec<_>>(),
        })
    }

    pub fn is_healthy(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader.is_some()
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
