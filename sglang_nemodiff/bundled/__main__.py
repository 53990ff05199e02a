from sglang_nemodiff.bundled import bundled_model_path

print(bundled_model_path())
