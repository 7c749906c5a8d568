// The README's pictures of the Dagster UI, taken in headless Chromium (Debian's package), and
// a check of what the asset pages show: every PNG plot the assets embed renders at its size,
// and no metadata table is cut at the right edge of a 1440-pixel-wide window.
//   npm install playwright-core        (outside the project; NODE_PATH to its node_modules)
//   prefpack run                       (and the difficulty job, for its two plots:
//   DAGSTER_HOME="$PWD/.dagster" dg launch --job difficulty_job)
//   (set -m; prefpack ui --port 3456 &)
//   NODE_PATH=... node docs/screenshot.js http://127.0.0.1:3456 docs
// Writes OUT/asset_graph.png and OUT/plots/<asset>-<key>.png; exits 1 naming each plot that
// did not render and each table that does not fit.
const { chromium } = require('playwright-core');

// (asset, metadata key of its PNG plot, width x height in pixels as assets/plots.py draws it)
const PLOTS = [
  ['curated_pairs', 'funnel_plot', [640, 320]],
  ['curated_pairs', 'length_bias_plot', [640, 480]],
  ['tokenized_pairs', 'length_plot', [640, 320]],
  ['packed_shards', 'fill_plot', [640, 320]],
  ['trained_model', 'loss_plot', [640, 480]],
  ['selected_model', 'loss_plot', [640, 480]],
  ['difficulty_scores', 'difficulty_plot', [640, 320]],
  ['selected_shards', 'difficulty_plot', [640, 320]],
];
// Pages whose inline tables must fit: every asset with metadata tables.
const PAGES = ['normalized_pairs', 'curated_pairs', 'tokenized_pairs', 'packed_shards',
  'difficulty_scores', 'selected_shards'];
const NARROW = { width: 1440, height: 900 };

// The asset's page, once the metadata row `key` of its latest materialization is there.
async function open(page, base, asset, key) {
  await page.goto(`${base}/assets/${asset}`, { waitUntil: 'networkidle' });
  const skip = page.getByRole('button', { name: 'Skip' }); // the first-visit newsletter modal
  if (await skip.count()) await skip.click();
  const row = page.locator('tr', { has: page.getByText(key, { exact: true }) }).first();
  await row.waitFor({ timeout: 30000 });
  return row;
}

// The plot's markdown is over the UI's 1,000 characters, so it opens from "[Show Markdown]".
async function plot(page, base, asset, key, out) {
  const row = await open(page, base, asset, key);
  await row.getByText('[Show Markdown]').click();
  const dialog = page.getByRole('dialog');
  const image = dialog.locator('img').first();
  await image.waitFor({ timeout: 15000 });
  const size = await image.evaluate((img) => img.complete && [img.naturalWidth, img.naturalHeight]);
  await dialog.screenshot({ path: `${out}/plots/${asset}-${key}.png` });
  await page.keyboard.press('Escape');
  return size || [0, 0];
}

// Tables in the value cells of the metadata table, and the element that clips them.
async function cutTables(page) {
  return page.evaluate(() => {
    const cut = [];
    for (const row of document.querySelectorAll('tr')) {
      const cells = row.querySelectorAll(':scope > td');
      if (cells.length < 3) continue;
      const value = cells[cells.length - 1];
      let clip = value;
      while (clip && getComputedStyle(clip).overflowX === 'visible') clip = clip.parentElement;
      const edge = (clip || document.body).getBoundingClientRect().right;
      for (const table of value.querySelectorAll('table')) {
        const right = table.getBoundingClientRect().right;
        if (right > edge + 1) cut.push(`${cells[0].innerText.trim()} (${Math.round(right - edge)} px)`);
      }
    }
    return cut;
  });
}

(async () => {
  const [base, out] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    // No background networking: this machine's network is closed.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1800, height: 640 } });
  const url = `${base}/assets/trained_model?view=lineage&lineageScope=upstream&lineageDepth=10`;
  await page.goto(url, { waitUntil: 'networkidle' });
  const skip = page.getByRole('button', { name: 'Skip' });
  if (await skip.count()) await skip.click();
  await page.waitForTimeout(6000); // the graph lays itself out
  await page.screenshot({ path: `${out}/asset_graph.png` });

  let failed = 0;
  await page.setViewportSize({ width: 1800, height: 900 });
  require('fs').mkdirSync(`${out}/plots`, { recursive: true });
  for (const [asset, key, [width, height]] of PLOTS) {
    const [w, h] = await plot(page, base, asset, key, out);
    const ok = w === width && h === height;
    console.log(`${asset} ${key}: ${ok ? 'rendered' : 'NOT RENDERED as drawn'}, ${w} x ${h} px`);
    if (!ok) failed += 1;
  }
  await page.setViewportSize(NARROW);
  for (const asset of PAGES) {
    await open(page, base, asset, 'path');
    const cut = await cutTables(page);
    console.log(`${asset} tables at ${NARROW.width} px: ${cut.length ? `CUT ${cut.join(', ')}` : 'all fit'}`);
    if (cut.length) failed += 1;
  }
  await browser.close();
  process.exit(failed ? 1 : 0);
})();
