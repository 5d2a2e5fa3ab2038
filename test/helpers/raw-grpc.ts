import http2 from 'node:http2';
import path from 'node:path';
import {
  type ChannelCredentials,
  type Client,
  credentials,
  loadPackageDefinition,
  makeClientConstructor,
  makeGenericClientConstructor,
  Metadata,
  type ServiceDefinition,
  type ServiceError,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { service as healthService } from 'grpc-health-check';

/** Every SessionStore method: its path and whether each side streams. */
export const METHODS = {
  Get: { requestStream: false, responseStream: false },
  Put: { requestStream: false, responseStream: false },
  Delete: { requestStream: false, responseStream: false },
  Batch: { requestStream: false, responseStream: false },
  List: { requestStream: false, responseStream: true },
  ListPages: { requestStream: false, responseStream: true },
  Watch: { requestStream: false, responseStream: true },
  Pipe: { requestStream: true, responseStream: true },
} as const;
export type MethodName = keyof typeof METHODS;

const identity = (b: Buffer) => b;

/**
 * A SessionStore client that sends and receives raw bytes (identity serializers), so a test
 * can send anything at all, valid protobuf or not.
 */
export function rawStoreClient(address: string, creds: ChannelCredentials = credentials.createInsecure()): Record<string, Function> & Client {
  const definition: Record<string, ServiceDefinition[string]> = {};
  for (const [name, shape] of Object.entries(METHODS)) {
    definition[name] = {
      path: `/sessions.kv.v1.SessionStore/${name}`,
      ...shape,
      requestSerialize: identity,
      requestDeserialize: identity,
      responseSerialize: identity,
      responseDeserialize: identity,
    };
  }
  const Ctor = makeGenericClientConstructor(definition, 'SessionStore');
  return new Ctor(address, creds) as unknown as Record<string, Function> & Client;
}

export interface CallOutcome {
  code: number;
  details: string;
  messages: number;
}

/**
 * Calls one method with raw request bytes and resolves with the final status. Server-streaming
 * calls are cancelled after `streamMs` (Watch never ends by itself); for Pipe every buffer is
 * one message on the stream.
 */
export function callRaw(
  client: Record<string, Function>,
  method: MethodName,
  requests: Buffer[],
  metadata = new Metadata(),
  options: { deadlineMs?: number; streamMs?: number } = {},
): Promise<CallOutcome> {
  const deadline = Date.now() + (options.deadlineMs ?? 5000);
  return new Promise((resolve) => {
    let messages = 0;
    const fn = client[method].bind(client);
    const shape = METHODS[method];
    if (!shape.requestStream && !shape.responseStream) {
      fn(requests[0] ?? Buffer.alloc(0), metadata, { deadline }, (err: ServiceError | null) => {
        resolve(err ? { code: err.code, details: err.details, messages: 0 } : { code: 0, details: '', messages: 1 });
      });
      return;
    }
    const call = shape.requestStream ? fn(metadata, { deadline }) : fn(requests[0] ?? Buffer.alloc(0), metadata, { deadline });
    call.on('data', () => (messages += 1));
    call.on('error', () => undefined);
    call.on('status', (s: { code: number; details: string }) => {
      clearTimeout(timer);
      resolve({ code: s.code, details: s.details, messages });
    });
    if (shape.requestStream) {
      for (const r of requests) call.write(r);
      call.end();
    }
    const timer = setTimeout(() => call.cancel(), options.streamMs ?? 300);
  });
}

/** A gRPC message frame: compressed flag, 4-byte big-endian length, message. */
export function frame(message: Buffer, declaredLength = message.length): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt32BE(declaredLength, 1);
  return Buffer.concat([header, message]);
}

export interface Http2Outcome {
  /** grpc-status, if the server sent one. */
  code: number | undefined;
  details: string;
  /** True when the test gave up waiting (a streaming call that was still open). */
  cancelled: boolean;
}

/**
 * Sends arbitrary bytes as the body of one gRPC call over plain HTTP/2 (so frames can be
 * truncated or lie about their length) and resolves with grpc-status and grpc-message. Pass a
 * session to reuse one connection for many calls.
 */
export function http2Call(
  target: number | http2.ClientHttp2Session,
  method: MethodName,
  body: Buffer,
  headers: Record<string, string> = {},
  waitMs = 2000,
): Promise<Http2Outcome> {
  return new Promise((resolve, reject) => {
    const session = typeof target === 'number' ? http2.connect(`http://127.0.0.1:${target}`) : target;
    if (typeof target === 'number') session.on('error', reject);
    const stream = session.request({
      ':method': 'POST',
      ':path': `/sessions.kv.v1.SessionStore/${method}`,
      'content-type': 'application/grpc',
      te: 'trailers',
      ...headers,
    });
    let code: number | undefined;
    let details = '';
    let cancelled = false;
    const take = (h: http2.IncomingHttpHeaders) => {
      if (h['grpc-status'] !== undefined) code = Number(h['grpc-status']);
      if (h['grpc-message'] !== undefined) details = decodeURIComponent(String(h['grpc-message']));
    };
    stream.on('response', take);
    stream.on('trailers', take);
    stream.on('data', () => undefined);
    stream.on('error', () => undefined);
    stream.on('close', () => {
      clearTimeout(timer);
      if (typeof target === 'number') session.close();
      resolve({ code, details, cancelled });
    });
    // A streaming method may legitimately wait for more: give up after waitMs.
    const timer = setTimeout(() => {
      cancelled = true;
      stream.close(http2.constants.NGHTTP2_CANCEL);
    }, waitMs);
    stream.end(body);
  });
}

/** A grpc.health.v1.Health client. */
export function healthClient(address: string, creds: ChannelCredentials = credentials.createInsecure()) {
  const Ctor = makeClientConstructor(healthService as ServiceDefinition, 'Health');
  return new Ctor(address, creds) as unknown as {
    check(req: { service: string }, cb: (err: ServiceError | null, res: { status: string }) => void): void;
    watch(req: { service: string }): NodeJS.EventEmitter & { cancel(): void };
    close(): void;
  };
}

/** A grpc.reflection.v1.ServerReflection client, from the proto file @grpc/reflection ships. */
export function reflectionClient(address: string) {
  const root = path.dirname(require.resolve('@grpc/reflection/package.json'));
  const definition = loadSync(path.join(root, 'build', 'proto', 'grpc', 'reflection', 'v1', 'reflection.proto'), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = loadPackageDefinition(definition) as unknown as {
    grpc: { reflection: { v1: { ServerReflection: new (address: string, creds: ChannelCredentials) => Client & { ServerReflectionInfo(): NodeJS.EventEmitter & { write(message: object): boolean; end(): void; cancel(): void } } } } };
  };
  return new pkg.grpc.reflection.v1.ServerReflection(address, credentials.createInsecure());
}
