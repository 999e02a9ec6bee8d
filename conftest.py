"""Notebooks run under nbval in fast mode (``FAST = True`` set in their parameters cell); tests are marked by what they run."""

import pytest

_MARKED_PATHS = {
    "/notebooks/": ("notebook", "slow"),
    "/tests/explorer/test_browser.py": ("browser", "slow"),
    "/tests/explorer/test_model.py": ("slow",),
    "/tests/test_scripts.py": ("slow",),
    "/tests/tokens/test_distributed_extraction.py": ("distributed", "slow"),
    "/tests/training/test_distributed.py": ("distributed", "slow"),
}
# single tests that take a second or more (extraction, real images, rendering many panels)
_SLOW_TESTS = (
    "test_interrupted_extraction_never_reads_as_complete",
    "test_epoch_covers_every_training_item_once",
    "test_large_image_is_decoded_at_a_reduced_scale",
    "test_a_failing_notebook_does_not_stop_the_others",
    "test_chance_line_and_legend_entry",
    "test_query_group_gallery_layout_colours_and_data",
    "test_each_preset_carries_the_reference_final_norm",
    "test_every_key_component_invalidates",
    "test_fast_sizes_are_small_and_full_sizes_are_the_standard_ones",
    "test_generation_is_deterministic_and_seeded",
    "test_labels_do_not_overlap_on_a_crowded_zoo",
    "test_error_bars_appear_with_std_columns_only",
    "test_torchrun_train_lands_in_the_probe_cache_one_process_reads",
    "test_train_tunes_every_probe_and_writes_the_runs",
    "test_stored_views_are_the_backbone_on_the_seeded_crops",
)


def pytest_collection_modifyitems(config, items):
    """Mark whole files by what they run: notebooks (nbval and nbclient), the browser, the zoo scripts.

    A notebook's parameters cell, collected by nbval, gets ``FAST = True`` (:func:`epviz.reproduce.set_parameters`).
    """
    from epviz.reproduce import set_parameters

    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source = set_parameters(cell.source, FAST=True)
        path = item.path.as_posix()
        name = item.name
        if name.startswith("test_torchrun_"):
            item.add_marker(pytest.mark.distributed)
        if name.startswith(_SLOW_TESTS) or (name.startswith("test_constant_maps_never_yield_a_box[") and "-224-" in name):
            item.add_marker(pytest.mark.slow)
        for part, marks in _MARKED_PATHS.items():
            if part in path:
                for mark in marks:
                    item.add_marker(getattr(pytest.mark, mark))
