import { SqliteBackend } from '../services/store/backends/sqlite';
import { describeBackendContract } from './backend-contract';
import { tempDir } from './helpers/procs';

describeBackendContract('sqlite', async () => {
  const tmp = tempDir();
  const backend = new SqliteBackend({ dataDir: tmp.dir, synchronous: 'FULL', sweepIntervalMs: 20, sweepBatch: 100, maxOpsPerCommit: 2000 });
  return {
    backend,
    close: async () => {
      await backend.close();
      tmp.remove();
    },
  };
});
