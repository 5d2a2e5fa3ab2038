import path from 'node:path';
import type { Server } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { protoPath as healthProto } from 'grpc-health-check';
import { projectRoot } from '../shared/env';

/**
 * gRPC server reflection (v1 and v1alpha) for the SessionStore and health services, so generic
 * tools such as grpcurl can list and call them without the proto files.
 */
export function addReflection(server: Server): void {
  const definition = loadSync([path.join(projectRoot, 'proto', 'kv.proto'), healthProto], {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  new ReflectionService(definition).addToServer(server);
}
