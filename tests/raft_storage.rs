//! openraft's storage conformance suite, run against our redb log store and state machine.

use apim::cluster::{NodeId, TypeConfig};
use apim::store::{AuditKeyPaths, LogStore, StateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};

struct RedbStores;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbStores {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let io = |e: String| -> StorageError<NodeId> {
            StorageIOError::write(openraft::AnyError::error(e)).into()
        };
        let dir = tempfile::tempdir().map_err(|e| io(e.to_string()))?;
        let log = LogStore::open(dir.path()).map_err(|e| io(format!("{e:#}")))?;
        let key = AuditKeyPaths {
            private: dir.path().join("k"),
            public: dir.path().join("k.pub"),
        };
        let sm = StateMachine::open(dir.path(), key).map_err(|e| io(format!("{e:#}")))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_redb() {
    Suite::test_all(RedbStores).expect("openraft storage suite");
}
