// Segment's and RudderStack's Node.js libraries, unmodified, against a live gateway.
//
// Run by tests/api/sdk_clients.rs as `node sdk_e2e.js <gateway address> <write key>` from
// this directory (installed with `npm ci`). Prints one JSON report on its last line; exits 1
// when a library reported a failure.
'use strict'

const { Analytics: SegmentAnalytics } = require('@segment/analytics-node')
const RudderAnalytics = require('@rudderstack/rudder-sdk-node')

const [host, writeKey] = process.argv.slice(2)
const failures = []
const report = {
  failures,
  versions: {
    segment: require('@segment/analytics-node/package.json').version,
    rudder: require('@rudderstack/rudder-sdk-node/package.json').version,
  },
}

async function segmentCalls() {
  // @segment/analytics-node 3.1: destination selection with `integrations`.
  const analytics = new SegmentAnalytics({ writeKey, host, flushAt: 3, maxRetries: 0 })
  analytics.on('error', (error) => failures.push({ library: 'segment', error: String(error && error.reason || error) }))
  analytics.track({ userId: 'node-seg-off', event: 'Not For Refiner', messageId: 'node-seg-off',
    integrations: { Refiner: false } })
  analytics.track({ userId: 'node-seg-alloff', event: 'Not For Anyone', messageId: 'node-seg-alloff',
    integrations: { All: false } })
  analytics.track({ userId: 'node-seg-on', event: 'Selected', messageId: 'node-seg-on',
    integrations: { All: false, Refiner: true } })
  await analytics.closeAndFlush({ timeout: 20000 })
}

async function rudderCalls() {
  // @rudderstack/rudder-sdk-node 3.0: gzip and Basic auth by default; it only warns about
  // events over 32 KB and sends them.
  const client = new RudderAnalytics(writeKey, {
    dataPlaneUrl: host,
    flushAt: 4,
    flushInterval: 20000,
    retryCount: 0,
    logLevel: 'error',
    errorHandler: (error) => failures.push({ library: 'rudder', error: String(error) }),
  })
  client.identify({ userId: 'node-rud', messageId: 'node-rud-identify',
    traits: { email: 'node-rud@example.com', plan: 'team' } })
  client.track({ userId: 'node-rud-mixed', event: 'Before', messageId: 'node-rud-before' })
  client.track({ userId: 'node-rud-mixed', event: 'Huge', messageId: 'node-rud-huge',
    properties: { blob: 'z'.repeat(40000) } })
  client.track({ userId: 'node-rud-mixed', event: 'After', messageId: 'node-rud-after' })
  await client.flush()
}

async function main() {
  await segmentCalls()
  await rudderCalls()
  console.log(JSON.stringify(report))
  process.exit(failures.length ? 1 : 0)
}

main().catch((error) => {
  failures.push({ error: String(error && error.stack || error) })
  console.log(JSON.stringify(report))
  process.exit(1)
})
