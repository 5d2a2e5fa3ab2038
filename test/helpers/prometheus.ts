import assert from 'node:assert/strict';

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*';
const SAMPLE = new RegExp(`^(${NAME})(?:\\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\\\n]|\\\\.)*",?)*)\\})? (\\S+)(?: -?\\d+)?$`);
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/**
 * Parses the Prometheus text exposition format strictly enough to catch a malformed page: every
 * line is empty, a HELP, a TYPE or a sample; every sample belongs to a declared family and has a
 * numeric value. Returns the samples keyed by `name{labels}` as printed.
 */
export function parsePrometheus(text: string): Map<string, number> {
  const families = new Map<string, string>();
  const samples = new Map<string, number>();
  assert.ok(text.endsWith('\n'), 'ends with a newline');
  for (const line of text.split('\n').slice(0, -1)) {
    if (line === '') continue; // the format allows empty lines
    if (line.startsWith('# HELP ')) {
      assert.match(line, new RegExp(`^# HELP ${NAME} .*$`));
      continue;
    }
    if (line.startsWith('# TYPE ')) {
      const [, , name, type] = line.split(' ');
      assert.ok(TYPES.has(type), `known type in: ${line}`);
      assert.ok(!families.has(name), `one TYPE line for ${name}`);
      families.set(name, type);
      continue;
    }
    const match = SAMPLE.exec(line);
    assert.ok(match, `a valid sample line: ${JSON.stringify(line)}`);
    const [, name, labels, raw] = match;
    const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw);
    // prom-client writes NaN as "Nan" (e.g. an event-loop mean before any sample); parsers accept any case.
    assert.ok(/^nan$/i.test(raw) || !Number.isNaN(value), `numeric value in: ${line}`);
    const family = families.has(name) ? name : name.replace(/_(bucket|sum|count)$/, '');
    assert.ok(families.has(family), `sample ${name} belongs to a declared family`);
    samples.set(labels ? `${name}{${labels}}` : name, value);
  }
  return samples;
}
