import { credentials, makeGenericClientConstructor, type ServiceDefinition } from '@grpc/grpc-js';
import { service } from 'grpc-health-check';

const HealthClient = makeGenericClientConstructor(service as unknown as ServiceDefinition, 'grpc.health.v1.Health');

/** One grpc.health.v1 Check against a store: 'SERVING', 'NOT_SERVING', ... or the error's message. */
export function checkHealth(port: number, serviceName = 'sessions.kv.v1.SessionStore'): Promise<string> {
  const client = new HealthClient(`127.0.0.1:${port}`, credentials.createInsecure()) as unknown as {
    check(req: { service: string }, options: { deadline: number }, cb: (err: Error | null, res?: { status: string | number }) => void): void;
    close(): void;
  };
  return new Promise((resolve) =>
    client.check({ service: serviceName }, { deadline: Date.now() + 2000 }, (err, res) => {
      client.close();
      resolve(err ? `error: ${err.message}` : String(res!.status));
    }),
  );
}

/** Polls checkHealth until it answers `wanted`; rejects with the last answer after timeoutMs. */
export async function waitForHealth(port: number, wanted: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  while ((last = await checkHealth(port)) !== wanted) {
    if (Date.now() > deadline) throw new Error(`health stayed ${last}, expected ${wanted}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
