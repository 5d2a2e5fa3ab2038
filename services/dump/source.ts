import {
  type ClientReadableStream,
  connectivityState,
  type Metadata,
  type ServiceError,
  status,
} from '@grpc/grpc-js';
import { authMetadata, CHANNEL_OPTIONS, channelCredentials } from '../client/store-client';
import { type Entry, type ListRequest, SessionStoreClient, SessionStoreService, type WatchEvent } from '../generated/kv';
import { decodeEntryPage } from './entry-page';

/** A failure talking to the store (exit code 1); the message is one line meant for a person. */
export class StoreUnreachableError extends Error {
  override name = 'StoreUnreachableError';
}

export interface SourceOptions {
  /** The gRPC target, already normalized to host:port. */
  target: string;
  token?: string;
  /** TLS (decided by resolveEndpoint), trusting tlsCa when given, else the default roots. */
  tls: boolean;
  tlsCa?: Buffer;
  /** Where tlsCa came from (--tls-ca or STORE_TLS_CA), for error messages. */
  tlsCaFrom?: string;
  /** How long the store gets to accept the connection; a refused connection fails at once. */
  connectTimeoutMs: number;
}

export interface ListQuery {
  prefix: string;
  limit: number;
  keysOnly: boolean;
}

/** Entries grouped as they arrive; formatting a page at a time keeps per-entry work small. */
export type Page = readonly Entry[];

const FALLBACK_PAGE = 512;

const DUMP_CHANNEL_OPTIONS = {
  ...CHANNEL_OPTIONS,
  // A bigger HTTP/2 window than the 64 KB default: the store can send several pages ahead.
  'grpc-node.flow_control_window': 1024 * 1024,
};

/**
 * The store as bin/dump sees it: a listing (pages of entries) and a change feed. Calls start at
 * once without waitForReady, so a refused connection fails immediately (grpc-js fails pending
 * calls when the channel reaches TRANSIENT_FAILURE); a store that does not accept the connection
 * within connectTimeoutMs is given up on.
 */
export class StoreSource {
  private readonly client: SessionStoreClient;
  private readonly metadata: Metadata;
  private readonly calls = new Set<ClientReadableStream<unknown>>();
  private timedOut = false;
  private closing = false;
  /** True once the store has sent response headers on some call: the connection was made. */
  private answered = false;
  private readonly connectTimer: NodeJS.Timeout;

  constructor(private readonly options: SourceOptions) {
    this.client = new SessionStoreClient(options.target, channelCredentials(options.tls, options.tlsCa), DUMP_CHANNEL_OPTIONS);
    this.metadata = authMetadata(options.token);
    this.connectTimer = setTimeout(() => this.giveUpIfNotConnected(), options.connectTimeoutMs);
  }

  /** Live entries in key order, a page at a time; uses List when the store has no ListPages. */
  async *list(query: ListQuery): AsyncIterable<Page> {
    const request: ListRequest = { prefix: query.prefix, limit: query.limit, startAfter: '', keysOnly: query.keysOnly };
    let received = false;
    try {
      for await (const entries of this.track(this.listPages(request)) as AsyncIterable<Entry[]>) {
        received = true;
        yield entries;
      }
      return;
    } catch (err) {
      if (received || (err as ServiceError).code !== status.UNIMPLEMENTED) throw this.translate(err);
    }
    try {
      let page: Entry[] = [];
      for await (const entry of this.track(this.client.list(request, this.metadata)) as AsyncIterable<Entry>) {
        page.push(entry);
        if (page.length === FALLBACK_PAGE) {
          yield page;
          page = [];
        }
      }
      if (page.length > 0) yield page;
    } catch (err) {
      throw this.translate(err);
    }
  }

  /**
   * Subscribes to changes of keys with the prefix. Events go to onEvent, which may return a promise
   * to pause the feed until it settles; the returned promise rejects with a StoreUnreachableError
   * when the feed fails and resolves when it is cancelled.
   */
  watch(prefix: string, onEvent: (event: WatchEvent) => Promise<void> | undefined): Promise<void> {
    const call = this.track(this.client.watch({ prefix }, this.metadata));
    call.on('data', (event: WatchEvent) => {
      const wait = onEvent(event);
      if (!wait) return;
      call.pause();
      void wait.then(() => call.resume());
    });
    // The store sends headers once the feed is established: UNAVAILABLE after that is the feed
    // breaking (the store lost its change feed, or the connection dropped), not a failed connect.
    let established = false;
    call.once('metadata', () => (established = true));
    return new Promise((resolve, reject) => {
      call.on('error', (err: ServiceError) => {
        if (err.code === status.CANCELLED && this.closing) return resolve();
        if (err.code === status.UNAVAILABLE && established) {
          const why = err.details || err.message;
          // The store's own message may already say it (Redis: "... broke, so changes may have been missed; ...").
          const told = /may have been missed/.test(why) ? `${why}` : `changes may have been missed (${why})`;
          return reject(new StoreUnreachableError(`the change feed broke: ${told}; run it again`));
        }
        if (err.code === status.RESOURCE_EXHAUSTED && established) {
          // The store ends a Watch whose client stopped taking events: here, the output was not read.
          const why = err.details || err.message;
          return reject(new StoreUnreachableError(`the change feed ended: ${why} (the output was not read fast enough), so changes were missed; run it again`));
        }
        reject(this.translate(err));
      });
      call.on('end', () => reject(new StoreUnreachableError('the store ended the change feed (is it stopping?): later changes are not shown; run it again once the store is back')));
    });
  }

  /** Cancels every call and closes the channel. */
  close(): void {
    this.closing = true;
    clearTimeout(this.connectTimer);
    for (const call of this.calls) call.cancel();
    this.client.close();
  }

  /** ListPages with the fast page decoder in place of the generated one. */
  private listPages(request: ListRequest): ClientReadableStream<Entry[]> {
    const method = SessionStoreService.listPages;
    return this.client.makeServerStreamRequest(method.path, method.requestSerialize, decodeEntryPage, request, this.metadata);
  }

  private track<T extends ClientReadableStream<unknown>>(call: T): T {
    this.calls.add(call);
    call.once('metadata', () => {
      this.answered = true;
      clearTimeout(this.connectTimer);
    });
    call.once('close', () => this.calls.delete(call));
    return call;
  }

  private giveUpIfNotConnected(): void {
    if (this.client.getChannel().getConnectivityState(false) === connectivityState.READY) return;
    this.timedOut = true;
    for (const call of this.calls) call.cancel();
  }

  /**
   * Whether the store itself answered with this status rather than grpc-js failing the call: a
   * status the store sent comes with its response headers (on an error before any entry) or over a
   * connection that is still up (on an error mid-listing); one grpc-js made up has neither.
   */
  private fromStore(err: ServiceError): boolean {
    if (err.metadata && Object.keys(err.metadata.getMap()).length > 0) return true;
    return this.answered && this.client.getChannel().getConnectivityState(false) === connectivityState.READY;
  }

  /** One line that says what went wrong and, where it helps, what to do. */
  private translate(err: unknown): StoreUnreachableError {
    if (err instanceof StoreUnreachableError) return err;
    if (this.timedOut) {
      return new StoreUnreachableError(`no connection within ${this.options.connectTimeoutMs} ms (is the store running and listening there?)`);
    }
    const { code, details } = err as ServiceError;
    const text = details || (err as Error).message || 'unknown error';
    if (code === status.UNAUTHENTICATED) {
      return new StoreUnreachableError(`unauthenticated: ${text} (pass --token or set STORE_TOKEN)`);
    }
    if (code === status.UNAVAILABLE) {
      // The store's own UNAVAILABLE (its Redis is down, it is closing) says nothing about the
      // connection: its words, without hints about addresses or TLS, which would mislead.
      if (this.fromStore(err as ServiceError)) return new StoreUnreachableError(`the store is running but cannot serve: ${text}`);
      if (this.answered) return new StoreUnreachableError(`the connection to the store broke: ${text} (run it again)`);
      return new StoreUnreachableError(describeUnavailable(text, this.options));
    }
    if (code === status.CANCELLED) return new StoreUnreachableError('the store closed the call (is it stopping?); run it again once the store is back');
    if (code === status.UNIMPLEMENTED) return new StoreUnreachableError(`the store does not support this call (${text})`);
    return new StoreUnreachableError(`${status[code] ?? 'error'}: ${text}`);
  }
}

/** grpc-js wraps the socket error in a long sentence; keep the part a person acts on. Only for errors of the connection. */
function describeUnavailable(details: string, options: SourceOptions): string {
  const text = details.replace(/\s+/g, ' ').trim();
  if (/ECONNREFUSED/.test(text)) return 'connection refused (is the store running and listening there?)';
  if (/Name resolution failed|ENOTFOUND|EAI_AGAIN/.test(text)) return 'cannot resolve the host name';
  const ssl = /SSL routines:[^:]*:([^:]+)/.exec(text)?.[1];
  if (ssl === 'wrong version number') return 'TLS handshake failed: the store does not use TLS there (leave out https://, --tls and --tls-ca)';
  // Node checks the name only once the chain verified: another CA file would not help, another host name would.
  if (/ERR_TLS_CERT_ALTNAME_INVALID/.test(text)) {
    const host = options.target.replace(/:\d+$/, '');
    return `TLS handshake failed: the store certificate does not name ${host} (connect by a host name it lists, or add ${host} to its subjectAltName)`;
  }
  const lastError = /Last error: (?:Error: )?(.*?)(?:\.? Resolution note:.*)?$/.exec(text)?.[1] || text;
  // An HTTP/1 server answered the HTTP/2 preface: the web's port, say, where the store's was meant.
  if (!options.tls && /^Protocol error\b/.test(lastError)) {
    return 'something answers there, but not a gRPC server (the web service, say): give the address of the store';
  }
  if (options.tls) {
    // Without a CA file the default roots were trusted: naming --tls-ca as the culprit would mislead.
    const hint = options.tlsCa
      ? `does ${options.tlsCaFrom ?? '--tls-ca'} name the CA that signed the store certificate?`
      : 'the default roots do not trust it: pass --tls-ca <file> with the CA that signed the store certificate';
    return `TLS handshake failed: ${ssl ?? lastError} (${hint})`;
  }
  return `unavailable: ${lastError} (if the store uses TLS, pass --tls-ca <file> or --tls)`;
}
