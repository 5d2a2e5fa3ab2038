/** Baseline: a grpc-js server whose Get answers at once (no storage): the cost of grpc-js alone. */
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { SessionStoreService } from '../../services/generated/kv';

const server = new Server();
server.addService(SessionStoreService, {
  get: (_call: unknown, callback: (err: null, res: { found: boolean; entry: undefined }) => void) => callback(null, { found: false, entry: undefined }),
});
server.bindAsync(`127.0.0.1:${process.env.PORT ?? 0}`, ServerCredentials.createInsecure(), (err, port) => {
  if (err) throw err;
  process.stdout.write(JSON.stringify({ msg: 'listening', port }) + '\n');
});
process.on('SIGTERM', () => server.tryShutdown(() => process.exit(0)));
