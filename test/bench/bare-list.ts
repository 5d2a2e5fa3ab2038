/**
 * The dump benchmark's baselines: consume a listing and do nothing else, so the gap to bin/dump is
 * the cost of formatting and writing. Usage: node dist/test/bench/bare-list.js host:port [list|pages]
 */
import { Metadata } from '@grpc/grpc-js';
import { createRawClient } from '../../services/client/store-client';
import type { Entry, EntryPage } from '../../services/generated/kv';

const [address, rpc = 'pages'] = process.argv.slice(2);
const client = createRawClient({ address, deadlineMs: 0 });
const request = { prefix: '', limit: 0, startAfter: '', keysOnly: false };
let n = 0;
const stream =
  rpc === 'list'
    ? client.list(request, new Metadata()).on('data', (_: Entry) => (n += 1))
    : client.listPages(request, new Metadata()).on('data', (page: EntryPage) => (n += page.entries.length));
stream
  .on('error', (err) => {
    console.error(`bare-list: ${err.message}`);
    process.exit(1);
  })
  .on('end', () => {
    client.close();
    console.error(`${n} entries`);
  });
